"""Time grids, ODE/SDE samplers and guidance against upstream goldens and closed forms."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import assert_close, nhwc

from dit_jax import LightningDiT, apply_guidance
from dit_jax.convert import params_from_torch
from dit_jax.samplers import (
    guided_velocity_fn,
    integrate_ode,
    integrate_sde,
    kernels_in_compute_dtype,
    make_sampler,
    sample_latents,
    time_grid,
)

SAMPLING_CASES = ["ode_cfg_800ep", "ode_cfg_64ep", "ode_nocfg_shift", "ode_demo"]


def test_grid_constants():
    """SPEC 3.4 / 3.6 / 12: 250-point grid with shift 0.3."""
    t = time_grid(250, 0.3)
    assert t.dtype == np.float32 and t[0] == 0.0 and t[-1] == 1.0
    np.testing.assert_allclose(t[[1, 2, 248]], [0.00120822, 0.00242326, 0.9867374], rtol=5e-6)
    np.testing.assert_allclose(t[124], 0.2293, atol=1e-4)  # the (lower) median grid point
    evaluated = t[:-1]  # Euler evaluates the model at t_0 .. t_248, never at t = 1
    for start, unguided in [(0.10, 68), (0.11, 73), (0.125, 81)]:
        assert int(np.sum(evaluated < start)) == unguided
    np.testing.assert_array_equal(time_grid(5), np.array([0, 0.25, 0.5, 0.75, 1], np.float32))


def test_euler_evaluates_left_endpoints_only():
    """v(x, t) = t integrates to the left Riemann sum over the grid: 249 evaluations, t=1 never."""
    grid = time_grid(250, 0.3)
    x0 = jnp.zeros((2, 1, 1, 1))
    out = integrate_ode(lambda x, t: jnp.broadcast_to(t[:, None, None, None], x.shape), x0, grid)
    expected = np.sum(grid[:-1].astype(np.float64) * np.diff(grid.astype(np.float64)))
    np.testing.assert_allclose(out, expected, rtol=1e-5)


@functools.cache
def _sampling_setup(golden):
    g = golden("transport_euler_sampling")
    base = golden(g.meta["model_case"])
    cfg = base.meta["config"]
    return g, LightningDiT(**cfg), params_from_torch(base.params, LightningDiT(**cfg))


@pytest.mark.parametrize("case", SAMPLING_CASES)
def test_euler_trajectories_match_upstream(golden, case):
    g, model, params = _sampling_setup(golden)
    spec = g.meta["cases"][case]
    assert_close(time_grid(spec["num_sampling_steps"], spec["timestep_shift"]),
                 g[f"{case}.t_grid"], atol=0, rtol=0, name=f"{case}.t_grid")
    noise, labels = nhwc(g[f"{case}.init_noise"]), g[f"{case}.y"]
    options = dict(num_steps=spec["num_sampling_steps"], timestep_shift=spec["timestep_shift"],
                   return_trajectory=True)
    n = spec["n"]
    if spec["cfg_scale"]:
        # Upstream doubles the batch; its kept half is our whole batch (cfg_channels=3 as upstream).
        start = spec["cfg_interval_start"] if spec["cfg_interval"] else 0.0
        options.update(cfg_scale=spec["cfg_scale"], cfg_interval_start=start, cfg_channels=3)
        noise, labels = noise[:n], labels[:n]
    final, trajectory = make_sampler(model, **options)(params, noise, labels)
    assert_close(trajectory, nhwc(g[f"{case}.trajectory"])[:, :n], atol=1e-3, rtol=1e-3,
                 name=f"{case}.trajectory")
    assert_close(final, nhwc(g[f"{case}.final_sample"]), atol=1e-3, rtol=1e-3,
                 name=f"{case}.final_sample")


# Closed form: data x1 ~ N(M, S^2) per dimension, x0 ~ N(0, 1). The exact velocity
# E[x1 - x0 | x_t] is linear in x_t, and every correct sampler must reproduce N(M, S^2).
M, S = 2.0, 0.5


def _gaussian_velocity(x, t):
    tb = t[:, None, None, None]
    return M + (tb * S**2 - (1 - tb)) / (tb**2 * S**2 + (1 - tb) ** 2) * (x - tb * M)


@functools.cache
def _noise():
    return jax.random.normal(jax.random.key(0), (8192, 1, 1, 2))


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_ode_samplers_transport_gaussian(method):
    out = jax.jit(lambda x: integrate_ode(_gaussian_velocity, x, time_grid(250, 0.3),
                                          method=method))(_noise())
    np.testing.assert_allclose([out.mean(), out.std()], [M, S], atol=0.02)


def test_heun_is_second_order():
    coarse = time_grid(10)
    errors = {}
    for method in ("euler", "heun"):
        out = integrate_ode(_gaussian_velocity, _noise(), coarse, method=method)
        errors[method] = abs(float(out.std()) - S)
    assert errors["heun"] < errors["euler"] / 5, errors


@pytest.mark.parametrize("form", ["SBDM", "sigma"])
def test_sde_sampler_transports_gaussian(form):
    grid = time_grid(250, 0.0, 0.04, 1 - 0.04)
    out = jax.jit(lambda x: integrate_sde(_gaussian_velocity, x, grid, jax.random.key(1),
                                          diffusion_form=form))(_noise())
    np.testing.assert_allclose([out.mean(), out.std()], [M, S], atol=0.03)


def test_sde_noise_per_sample_does_not_depend_on_the_batch():
    """With one key per sample, a sample's SDE path is the same in any batch; one key for the
    batch draws each step's noise at once (upstream); other key shapes are refused."""
    grid = time_grid(20, 0.0, 0.04, 1 - 0.04)
    x = _noise()[:6]
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(6))
    sde = jax.jit(lambda x, rng: integrate_sde(_gaussian_velocity, x, grid, rng))
    whole = sde(x, keys)
    pick = jnp.array([4, 1])
    np.testing.assert_allclose(sde(x[pick], keys[pick]), whole[pick], rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(whole[0] - whole[1]).max()) > 0.1  # the samples' noises differ

    # raw uint32 keys are the same keys
    raw = jax.random.key_data(keys)
    np.testing.assert_array_equal(sde(x, raw), whole)
    # one key: the batch's noise, drawn by position in the batch
    batch = sde(x, jax.random.key(5))
    assert float(jnp.abs(sde(x[pick], jax.random.key(5)) - batch[pick]).max()) > 1e-3

    with pytest.raises(ValueError, match=r"one key or one per sample \(6,\); got keys of shape "
                                         r"\(3,\)"):
        integrate_sde(_gaussian_velocity, x, grid, keys[:3])


def test_sde_sampler_with_per_sample_keys_transports_gaussian():
    grid = time_grid(250, 0.0, 0.04, 1 - 0.04)
    keys = jax.random.split(jax.random.key(1), _noise().shape[0])
    out = jax.jit(lambda x: integrate_sde(_gaussian_velocity, x, grid, keys))(_noise())
    np.testing.assert_allclose([out.mean(), out.std()], [M, S], atol=0.03)


def test_guidance_interval_and_channels():
    cond = jnp.ones((2, 2, 2, 5))
    uncond = jnp.zeros((2, 2, 2, 5))
    t = jnp.array([0.05, 0.5])
    out = apply_guidance(cond, uncond, t, cfg_scale=4.0, cfg_interval_start=0.1)
    np.testing.assert_array_equal(out[0], 1.0)  # t < start: conditional only
    np.testing.assert_array_equal(out[1], 4.0)
    out = apply_guidance(cond, uncond, t, cfg_scale=4.0, cfg_channels=3)
    np.testing.assert_array_equal(out[..., :3], 4.0)
    np.testing.assert_array_equal(out[..., 3:], 1.0)


@functools.cache
def _tiny_model(**overrides):
    kwargs = dict(use_swiglu=True, use_rmsnorm=True, use_rope=True) | overrides
    model = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=16, depth=1,
                         num_heads=2, num_classes=3, **kwargs)
    x = jnp.zeros((2, 4, 4, 4))
    params = jax.jit(model.init)(jax.random.key(0), x, jnp.zeros(2), jnp.zeros(2, int))["params"]
    # shift away from the zero init so the model output (and guidance) is not trivially 0
    return model, jax.tree.map(lambda p: p + 0.1, nn.meta.unbox(params))


def test_sampler_is_one_scan_independent_of_steps():
    """The whole sampler is one jitted scan: its program does not grow with num_steps."""
    model, params = _tiny_model()
    noise, labels = jnp.zeros((2, 4, 4, 4)), jnp.array([0, 1])

    def program(steps):
        fn = functools.partial(sample_latents, model, num_steps=steps, cfg_scale=2.0)
        jaxpr = jax.make_jaxpr(fn)(params, noise, labels).jaxpr
        (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
        assert scan.params["length"] == steps - 1
        return len(jaxpr.eqns), len(scan.params["jaxpr"].jaxpr.eqns)

    assert program(10) == program(250)


def _converts(jaxpr) -> list:
    """(input shape, output dtype) of every convert_element_type in jaxpr and its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "convert_element_type":
            found.append((tuple(eqn.invars[0].aval.shape), eqn.outvars[0].aval.dtype))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _converts(sub)
    return found


@pytest.mark.parametrize("overrides", [{}, dict(use_qknorm=True, learn_sigma=True,
                                                 use_swiglu=False, use_rope=False)])
def test_bf16_sampling_casts_the_kernels_once(overrides):
    """A bf16 sampler casts the matmul kernels to bf16 before its loop: the model computes
    the same values bit for bit (each matmul casts its kernel anyway), and no kernel is cast
    inside the loop any more; other parameters (embedding table, norms) stay float32."""
    model, params = _tiny_model(dtype=jnp.bfloat16, **overrides)
    cast = kernels_in_compute_dtype(model, params)
    dtypes = {"/".join(k.key for k in path): leaf.dtype
              for path, leaf in jax.tree_util.tree_leaves_with_path(cast)}
    assert {d for name, d in dtypes.items() if name.endswith("kernel")} == {jnp.dtype("bfloat16")}
    assert dtypes["y_embedder/embedding_table"] == jnp.float32
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 4))
    t, y = jnp.array([0.3, 0.8]), jnp.array([0, 3])
    apply = jax.jit(lambda p: model.apply({"params": p}, x, t, y))
    np.testing.assert_array_equal(apply(cast), apply(params))

    kernel_shapes = {leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                     if path[-1].key == "kernel"}
    jaxpr = jax.make_jaxpr(functools.partial(sample_latents, model, num_steps=4,
                                             cfg_scale=2.0))(params, x, y[:2] % 3).jaxpr
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    in_loop = [s for s, dt in _converts(scan.params["jaxpr"].jaxpr)
               if s in kernel_shapes and dt == jnp.bfloat16]
    before = [s for s, dt in _converts(jaxpr) if s in kernel_shapes and dt == jnp.bfloat16]
    assert in_loop == [] and len(before) >= len(kernel_shapes) - 1, (in_loop, before)
    f32_model, f32_params = _tiny_model()
    assert kernels_in_compute_dtype(f32_model, f32_params) is f32_params


def test_sample_latents_runs_every_method():
    model, params = _tiny_model()
    noise = jax.random.normal(jax.random.key(2), (2, 4, 4, 4))
    labels = jnp.array([0, 2])
    for method in ("euler", "heun", "euler_maruyama"):
        out = make_sampler(model, method=method, num_steps=8, timestep_shift=0.3, cfg_scale=3.0,
                           cfg_interval_start=0.1)(params, noise, labels, jax.random.key(3))
        assert out.shape == noise.shape and bool(jnp.all(jnp.isfinite(out)))
    with pytest.raises(ValueError, match="needs an rng"):
        sample_latents(model, params, noise, labels, method="euler_maruyama", num_steps=4)
    with pytest.raises(ValueError, match="unknown sampling method"):
        sample_latents(model, params, noise, labels, method="rk4", num_steps=4)


class _CountingModel:
    """A stand-in LightningDiT whose calls record their batch size (a side effect XLA keeps)."""

    num_classes = 3

    def __init__(self):
        self.batches = []

    def apply(self, variables, x, t, y):
        jax.debug.callback(lambda rows: self.batches.append(rows.shape[0]), x)
        is_null = (y == self.num_classes).astype(x.dtype)[:, None, None, None]
        return x + t[:, None, None, None] - is_null


def test_unguided_steps_run_only_the_conditional_half():
    """Released sampling (250 steps, shift 0.3, interval from 0.125): 81 of the 249 Euler calls
    are before the interval and run the batch once; the other 168 run it doubled."""
    model = _CountingModel()
    noise, labels = jnp.ones((2, 1, 1, 1)), jnp.array([0, 1])
    out = jax.jit(functools.partial(sample_latents, model, params={}, num_steps=250,
                                    timestep_shift=0.3, cfg_scale=6.7,
                                    cfg_interval_start=0.125))(noise=noise, labels=labels)
    jax.block_until_ready(out)
    assert model.batches.count(2) == 81 and model.batches.count(4) == 168


def test_conditional_only_velocity_equals_the_guided_one():
    """Skipping the unconditional half changes nothing but rounding: before the interval the
    velocity is the conditional half of the doubled call, inside it the guided combination, and
    a batch with times on both sides takes the doubled call."""
    model, params = _tiny_model()
    x = jax.random.normal(jax.random.key(4), (2, 4, 4, 4))
    labels = jnp.array([0, 2])
    guidance = dict(cfg_scale=4.0, cfg_interval_start=0.3, cfg_channels=3)
    velocity = jax.jit(guided_velocity_fn(model, params, labels, **guidance))
    for t in ([0.1, 0.1], [0.5, 0.5], [0.1, 0.5]):
        t = jnp.array(t)
        full = model.apply({"params": params}, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                           jnp.array([0, 2, 3, 3]))
        expected = apply_guidance(full[:2], full[2:], t, **guidance)
        np.testing.assert_allclose(velocity(x, t), expected, rtol=1e-5, atol=1e-6)
    # the skip is a real branch in the compiled program (XLA folds cheap ones into a select)
    hlo = velocity.lower(x, jnp.array([0.1, 0.1])).compile().as_text()
    assert "conditional(" in hlo
