"""Samplers for the flow model: Euler / Heun ODE and Euler-Maruyama SDE, all `lax.scan` loops.

Time runs from t = 0 (noise) to t = 1 (data). The grid is upstream's: ``num_steps`` points
(250 for the released results, i.e. 249 Euler steps, the model never evaluated at t = 1),
optionally warped by the timestep shift ``t -> s t / (1 + (s - 1) t)`` (s = 0.3 puts small steps
near the noise end). Guidance: `guided_velocity_fn` (CFG with interval and channel option).

    sample = make_sampler(model, num_steps=250, timestep_shift=0.3, cfg_scale=6.7,
                          cfg_interval_start=0.125, cfg_channels=3)
    latents = sample(params, noise, labels)      # noise (B, H, W, C), labels (B,)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.guidance import apply_guidance
from dit_jax.transport import score_from_velocity

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x (B,...), t (B,)) -> v


def linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """float32 linspace evaluated as PyTorch does (first half from start, second from end)."""
    if num == 1:
        return np.array([start], np.float32)
    step = np.float64(np.float32((end - start) / (num - 1)))
    i = np.arange(num, dtype=np.float64)
    values = np.where(i < num // 2, start + i * step, end - (num - 1 - i) * step)
    return values.astype(np.float32)


def time_grid(num_steps: int, shift: float = 0.0, t0: float = 0.0, t1: float = 1.0) -> np.ndarray:
    """Upstream sampling grid (num_steps,) float32; shift > 0 applies s t / (1 + (s - 1) t)."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 (grid points incl. both ends), got {num_steps}")
    t = linspace_f32(t0, t1, num_steps)
    if shift > 0:
        s = np.float32(shift)
        t = (s * t) / (np.float32(1) + np.float32(shift - 1) * t)
    return t.astype(np.float32)


def _at(t: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.full((x.shape[0],), t, jnp.float32)


def integrate_ode(velocity_fn: VelocityFn, x: jax.Array, grid, *, method: str = "euler",
                  return_trajectory: bool = False):
    """Integrate dx/dt = v(x, t) over `grid` starting from x at grid[0].

    'euler': x += dt v(x, t_k) (one evaluation per step); 'heun': explicit trapezoid
    (two evaluations per step). Returns x at grid[-1], and if asked the states at every grid
    point (len(grid), *x.shape) with trajectory[0] = x.
    """
    ts = jnp.asarray(grid, jnp.float32)

    def step(x, t_pair):
        t0, t1 = t_pair
        dt = t1 - t0
        k1 = velocity_fn(x, _at(t0, x))
        if method == "euler":
            x_next = x + dt * k1
        elif method == "heun":
            k2 = velocity_fn(x + dt * k1, _at(t1, x))
            x_next = x + dt * 0.5 * (k1 + k2)
        else:
            raise ValueError(f"unknown ODE method {method!r} (use 'euler' or 'heun')")
        return x_next, (x_next if return_trajectory else None)

    x_final, states = jax.lax.scan(step, x, (ts[:-1], ts[1:]))
    if return_trajectory:
        return x_final, jnp.concatenate([x[None], states])
    return x_final


def diffusion_coefficient(t: jax.Array, form: str = "SBDM", norm: float = 1.0) -> jax.Array:
    """Diffusion D(t) of the reverse SDE for the linear path (upstream's forms).

    'SBDM': norm ((1 - t)^2 / t + (1 - t)) = norm (1 - t) / t, which keeps the SDE's marginals
    equal to the ODE's; infinite at t = 0, so start the SDE at t0 > 0.
    """
    if form == "SBDM":
        return norm * ((1 - t) ** 2 / t + (1 - t))
    if form in ("sigma", "linear"):
        return norm * (1 - t)
    if form == "constant":
        return norm * jnp.ones_like(t)
    if form == "decreasing":
        return 0.25 * (norm * jnp.cos(jnp.pi * t) + 1) ** 2
    if form == "increasing-decreasing":
        return norm * jnp.sin(jnp.pi * t) ** 2
    raise ValueError(f"unknown diffusion form {form!r}")


def _sde_step_noise(rng: jax.Array, num_steps: int, x: jax.Array):
    """(keys, draw): one key per SDE step and ``draw(key) -> noise like x``.

    rng is one key (the batch's noise of each step drawn at once, as upstream) or one key per
    sample, shape (B,): then sample i's noise depends on its key alone, not on the batch it
    is in. Typed keys (`jax.random.key`) or raw uint32 ones (`jax.random.PRNGKey`)."""
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    if rng.ndim == 0:
        keys = jax.random.split(rng, num_steps)  # (steps,)
        return keys, lambda key: jax.random.normal(key, x.shape, x.dtype)
    if rng.shape == x.shape[:1]:
        keys = jax.vmap(lambda k: jax.random.split(k, num_steps), out_axes=1)(rng)  # (steps, B)
        return keys, jax.vmap(lambda key: jax.random.normal(key, x.shape[1:], x.dtype))
    raise ValueError(f"the SDE sampler takes one key or one per sample ({x.shape[0]},); got "
                     f"keys of shape {rng.shape}")


def integrate_sde(velocity_fn: VelocityFn, x: jax.Array, grid, rng: jax.Array, *,
                  diffusion_form: str = "SBDM", diffusion_norm: float = 1.0,
                  last_step: str | None = "Mean", last_step_size: float = 0.04):
    """Euler-Maruyama for dx = [v + D s] dt + sqrt(2 D) dW, s = score from v, over `grid`
    (which should end at 1 - last_step_size), then a final noise-free step to t = 1:
    'Mean' (SDE drift), 'Euler' (velocity only) or None (no final step).

    rng: one key for the batch, or one per sample (B,) (`_sde_step_noise`).
    """
    ts = jnp.asarray(grid, jnp.float32)
    keys, draw = _sde_step_noise(rng, ts.shape[0] - 1, x)

    def sde_drift(x, t):
        tb = _at(t, x)
        v = velocity_fn(x, tb)
        d = diffusion_coefficient(t, diffusion_form, diffusion_norm)
        return v, v + d * score_from_velocity(v, x, tb), d

    def step(x, inputs):
        t0, t1, key = inputs
        dt = t1 - t0
        _, drift, d = sde_drift(x, t0)
        return x + drift * dt + jnp.sqrt(2 * d) * jnp.sqrt(dt) * draw(key), None

    x, _ = jax.lax.scan(step, x, (ts[:-1], ts[1:], keys))
    if last_step is None:
        return x
    v, drift, _ = sde_drift(x, ts[-1])
    if last_step == "Mean":
        return x + drift * last_step_size
    if last_step == "Euler":
        return x + v * last_step_size
    raise ValueError(f"unknown last_step {last_step!r} (use 'Mean', 'Euler' or None)")


def kernels_in_compute_dtype(model, params):
    """params with every matmul kernel (the `kernel` leaves) cast to the model's 16-bit
    compute dtype, once: each LightningDiT matmul casts its kernel to that dtype anyway, so
    the model computes the same values, and a sampler's loop no longer repeats the casts at
    every call (XLA:CPU keeps them inside it; a 20-point bf16 B/1 sample on an AVX512-BF16
    CPU: 9.8-9.9 -> 9.4-9.7 s). float32 models get params back unchanged."""
    dtype = jnp.dtype(getattr(model, "dtype", jnp.float32))
    if dtype.itemsize >= 4:
        return params

    def cast(path, leaf):
        name = getattr(path[-1], "key", None)
        return leaf.astype(dtype) if name == "kernel" else leaf

    return jax.tree_util.tree_map_with_path(cast, params)


def guided_velocity_fn(model, params, labels: jax.Array, *, cfg_scale: float = 1.0,
                       cfg_interval_start: float = 0.0, cfg_channels: int | None = None
                       ) -> VelocityFn:
    """v(x, t) of a LightningDiT for fixed labels, with classifier-free guidance if
    cfg_scale > 1 (upstream's switch): one model call on [x; x] with [labels; null].

    Where every t is before the guidance interval (t < cfg_interval_start) the guided velocity
    is the conditional one, so only the conditional half runs (a `lax.cond`, the same result up
    to rounding). Upstream's `forward_with_cfg` runs both halves at every step: with the
    released sampling (250 steps, shift 0.3, interval from 0.125) 81 of the 249 calls need only
    half the batch.
    """
    variables = {"params": kernels_in_compute_dtype(model, params)}

    def conditional(x, t):
        return model.apply(variables, x, t, labels)

    if cfg_scale <= 1.0:
        return conditional
    null = jnp.full_like(labels, model.num_classes)
    y = jnp.concatenate([labels, null])

    def guided(x, t):
        out = model.apply(variables, jnp.concatenate([x, x]), jnp.concatenate([t, t]), y)
        n = x.shape[0]
        return apply_guidance(out[:n], out[n:], t, cfg_scale=cfg_scale,
                              cfg_interval_start=cfg_interval_start, cfg_channels=cfg_channels)

    if cfg_interval_start <= 0.0:  # t >= 0: guidance is always on
        return guided

    def velocity(x, t):
        return jax.lax.cond(jnp.all(t < cfg_interval_start), conditional, guided, x, t)

    return velocity


def sample_latents(model, params, noise: jax.Array, labels: jax.Array, rng: jax.Array | None = None,
                   *, method: str = "euler", num_steps: int = 250, timestep_shift: float = 0.0,
                   cfg_scale: float = 1.0, cfg_interval_start: float = 0.0,
                   cfg_channels: int | None = None, diffusion_form: str = "SBDM",
                   diffusion_norm: float = 1.0, last_step: str | None = "Mean",
                   last_step_size: float = 0.04, sde_t0: float = 0.04,
                   return_trajectory: bool = False):
    """Generate latents from noise (B, H, W, C) and labels (B,).

    method: 'euler' / 'heun' (ODE over `time_grid(num_steps, timestep_shift)`), or
    'euler_maruyama' (SDE over `time_grid(num_steps, timestep_shift, sde_t0, 1 -
    last_step_size)`; needs `rng`: one key, or one per sample (B,)). Every option except
    the arrays must be static under jit.
    """
    velocity = guided_velocity_fn(model, params, labels, cfg_scale=cfg_scale,
                                  cfg_interval_start=cfg_interval_start, cfg_channels=cfg_channels)
    if method in ("euler", "heun"):
        grid = time_grid(num_steps, timestep_shift)
        return integrate_ode(velocity, noise, grid, method=method,
                             return_trajectory=return_trajectory)
    if method == "euler_maruyama":
        if rng is None:
            raise ValueError("the SDE sampler needs an rng key")
        if return_trajectory:
            raise ValueError("return_trajectory is only supported by the ODE samplers")
        t1 = 1.0 - (last_step_size if last_step is not None else 0.0)
        grid = time_grid(num_steps, timestep_shift, sde_t0, t1)
        return integrate_sde(velocity, noise, grid, rng, diffusion_form=diffusion_form,
                             diffusion_norm=diffusion_norm, last_step=last_step,
                             last_step_size=last_step_size)
    raise ValueError(f"unknown sampling method {method!r} (euler, heun, euler_maruyama)")


def make_sampler(model, **options) -> Callable:
    """A jitted ``sample(params, noise, labels, rng=None)`` with the options fixed."""
    fn = functools.partial(sample_latents, model, **options)
    return jax.jit(lambda params, noise, labels, rng=None: fn(params, noise, labels, rng))
