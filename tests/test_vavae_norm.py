"""vavae_jax.norm: GroupNorm (+ swish) with per-channel statistics and a written-out gradient,
against Flax's nn.GroupNorm (two-pass variance, the same parameters)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vavae_jax.norm import GroupNorm


def flax_reference(swish, dtype=jnp.float32):
    norm = nn.GroupNorm(num_groups=8, epsilon=1e-6, use_fast_variance=False, dtype=dtype)
    if not swish:
        return norm.apply
    return lambda v, x: nn.swish(norm.apply(v, x))


def inputs(shape=(3, 6, 5, 32), seed=0):
    kx, ks, kb, kg = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = 2.0 * jax.random.normal(kx, shape) + 0.5  # an offset, so the centring matters
    c = shape[-1]
    params = {"scale": 1 + 0.3 * jax.random.normal(ks, (c,)), "bias": jax.random.normal(kb, (c,))}
    return x, {"params": params}, jax.random.normal(kg, shape)


@pytest.mark.parametrize("swish", [False, True])
def test_values_and_gradients_equal_flax(swish):
    x, variables, g = inputs()
    ours = GroupNorm(num_groups=8, epsilon=1e-6, swish=swish)
    shapes = jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(0), x))
    assert shapes == jax.tree.map(jnp.shape, variables)  # same parameter tree as Flax's
    got, got_vjp = jax.vjp(jax.jit(ours.apply), variables, x)
    want, want_vjp = jax.vjp(flax_reference(swish), variables, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    got_g, want_g = got_vjp(g), want_vjp(g)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 got_g, want_g)


def test_groups_are_normalised_per_sample():
    # each sample's group has mean 0 and variance 1 (scale 1, bias 0) whatever the others hold
    x = jnp.concatenate([jnp.zeros((1, 4, 4, 16)) + 3.0, jnp.full((1, 4, 4, 16), -1.0)])
    x = x + jax.random.normal(jax.random.PRNGKey(1), x.shape) * jnp.array([1.0, 5.0])[:, None,
                                                                                    None, None]
    norm = GroupNorm(num_groups=4, epsilon=0.0)
    y = norm.apply(norm.init(jax.random.PRNGKey(0), x), x).reshape(2, 16, 4, 4)
    groups = jnp.moveaxis(y, 2, 1).reshape(2, 4, -1)
    np.testing.assert_allclose(groups.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(groups.var(-1), 1.0, rtol=1e-4)


def test_bfloat16_result_with_float32_statistics():
    x, variables, g = inputs(seed=2)
    xb = x.astype(jnp.bfloat16)
    ours = GroupNorm(num_groups=8, epsilon=1e-6, swish=True, dtype=jnp.bfloat16)
    got, got_vjp = jax.vjp(ours.apply, variables, xb)
    want, want_vjp = jax.vjp(flax_reference(True, jnp.bfloat16), variables, xb)
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=2e-2,
                               rtol=2e-2)
    (dv, dx), (want_dv, want_dx) = got_vjp(g.astype(jnp.bfloat16)), want_vjp(
        g.astype(jnp.bfloat16))
    assert dx.dtype == jnp.bfloat16 and dv["params"]["scale"].dtype == jnp.float32
    np.testing.assert_allclose(dx.astype(jnp.float32), want_dx.astype(jnp.float32), atol=5e-2,
                               rtol=5e-2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-2), dv,
                 want_dv)


def test_channels_must_split_into_groups():
    norm = GroupNorm(num_groups=32, epsilon=1e-6, name="norm1")
    with pytest.raises(ValueError, match="norm1: 48 channels do not split into 32 groups"):
        norm.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 48)))
