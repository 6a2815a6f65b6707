"""Rectified-flow transport: linear path, velocity target, time sampling and the loss.

Convention (as upstream, from SiT): t = 0 is noise, t = 1 is data,
``x_t = t * x1 + (1 - t) * x0`` with x0 ~ N(0, I), target velocity ``u_t = x1 - x0``.
All arrays are NHWC; per-sample reductions run over every non-batch axis.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def sample_time(rng: jax.Array, batch: int, *, kind: str = "logit_normal", mu: float = 0.0,
                sigma: float = 1.0) -> jax.Array:
    """Training times (B,) float32: 'logit_normal' = sigmoid(N(mu, sigma^2)), or 'uniform'."""
    if kind == "logit_normal":
        return jax.nn.sigmoid(mu + sigma * jax.random.normal(rng, (batch,), jnp.float32))
    if kind == "uniform":
        return jax.random.uniform(rng, (batch,), jnp.float32)
    raise ValueError(f"unknown time distribution {kind!r} (use 'logit_normal' or 'uniform')")


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
    return t.reshape((-1,) + (1,) * (x.ndim - 1))


def interpolate(x0: jax.Array, x1: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Point on the linear path and its velocity: (x_t, u_t)."""
    tb = _bcast(t, x1)
    return tb * x1 + (1 - tb) * x0, x1 - x0


def cosine_similarity(a: jax.Array, b: jax.Array, axis: int = -1, eps: float = 1e-8) -> jax.Array:
    """PyTorch's ``cosine_similarity``: each vector divided by max(||v||, eps), then dotted.

    The norm is sqrt(max(sum v^2, eps^2)): the same value, but a finite gradient at v = 0
    (sqrt's derivative there is infinite, and 0 * inf would make the step's gradients NaN,
    e.g. at initialisation, where adaLN-Zero makes the prediction exactly 0)."""
    def clamped_norm(v):
        return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(v), axis=axis, keepdims=True), eps**2))

    return jnp.sum((a / clamped_norm(a)) * (b / clamped_norm(b)), axis=axis)


def velocity_loss_terms(pred: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
    """Per-sample loss terms, each (B,).

    mse: mean over (H, W, C) of (pred - target)^2 (upstream's logged "Train Loss").
    cos: mean over (H, W) of 1 - cosine similarity along channels (upstream cosine loss).
    """
    reduce = tuple(range(1, pred.ndim))
    mse = jnp.mean(jnp.square(pred - target), axis=reduce)
    cos = jnp.mean(1.0 - cosine_similarity(pred, target, axis=-1), axis=reduce[:-1])
    return {"mse": mse, "cos": cos}


def flow_matching_loss(
    velocity_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x1: jax.Array,
    x0: jax.Array,
    t: jax.Array,
    *,
    use_cosine_loss: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss for one batch with given noise x0 and times t.

    `velocity_fn(x_t, t)` is the model (labels and rngs bound by the caller). Returns
    ``(loss, terms)``: loss = mean_b mse + mean_b cos (cosine term when enabled, as upstream),
    terms = {'mse', 'cos', 'loss'} batch means (upstream logs only 'mse').
    """
    xt, ut = interpolate(x0, x1, t)
    per_sample = velocity_loss_terms(velocity_fn(xt, t), ut)
    mse, cos = jnp.mean(per_sample["mse"]), jnp.mean(per_sample["cos"])
    loss = mse + cos if use_cosine_loss else mse
    return loss, {"loss": loss, "mse": mse, "cos": cos}


def score_from_velocity(v: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
    """Score of p_t for the linear path: (t v - x) / (1 - t) (variance of x_t | x1 is 1 - t)."""
    tb = _bcast(t, x)
    return (tb * v - x) / (1 - tb)
