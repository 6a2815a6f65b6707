"""Learning-rate schedules of `make_optimizer` and the switch to uniform t (800-epoch recipe)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dit_jax.train_step import lr_schedule
from dit_jax.transport import sample_time


def test_warmup_then_cosine_and_linear_decay():
    cosine = lr_schedule(1.0, warmup_steps=10, decay="cosine", decay_steps=110,
                         final_lr_fraction=0.1)
    np.testing.assert_allclose([cosine(0), cosine(5), cosine(10)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(cosine(60), 0.55, atol=1e-6)  # half way down: (1 + 0.1) / 2
    np.testing.assert_allclose(cosine(110), 0.1, atol=1e-6)
    linear = lr_schedule(2.0, decay="linear", decay_steps=100)
    np.testing.assert_allclose([linear(0), linear(50), linear(100)], [2.0, 1.0, 0.0], atol=1e-6)
    assert lr_schedule(3.0) == 3.0  # upstream: constant
    with pytest.raises(ValueError, match="decay_steps=5 must exceed warmup_steps=10"):
        lr_schedule(1.0, warmup_steps=10, decay="cosine", decay_steps=5)


def test_uniform_time_after_switches_the_distribution():
    from dit_jax import LightningDiT
    from dit_jax.train_step import init_train_state, make_optimizer, train_step

    model = LightningDiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1,
                         num_heads=2, num_classes=10)
    optimizer = make_optimizer()
    state = nn.meta.unbox(init_train_state(model, optimizer, jax.random.key(0)))
    # away from the adaLN-Zero start (a zero prediction makes the loss independent of t)
    noise = lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape, p.dtype)
    state = state.replace(params=jax.tree.map(noise, state.params))
    batch = {"latents": jnp.ones((4, 4, 4, 4)), "labels": jnp.arange(4)}
    step = jax.jit(lambda s, n: train_step(s, batch, jax.random.key(1), model=model,
                                           optimizer=optimizer, uniform_time_after=n),
                   static_argnums=1)
    _, before = step(state, 0)
    _, after = step(state, 1)  # step 0 < 1: still logit-normal, the same loss
    np.testing.assert_array_equal(before["loss"], after["loss"])
    later = state.replace(step=jnp.asarray(5, jnp.int32))
    _, switched = step(later, 3)  # step 5 >= 3: uniform t, another loss
    _, kept = step(later, 0)
    assert not np.allclose(switched["loss"], kept["loss"])
    t_key = jax.random.key(2)
    assert not np.allclose(sample_time(t_key, 8), sample_time(t_key, 8, kind="uniform"))
