"""LightningDiT training step as a pure function: flow-matching loss, AdamW, EMA.

Upstream recipe (train.py): AdamW(lr 2e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0),
constant lr, no clipping, EMA 0.9999 updated after every step from an exact copy, label dropout
0.1, logit-normal t, loss = MSE + cosine. The runtime (`launch/`) jits `train_step` with
shardings and donation; nothing here touches devices, files or globals.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from dit_jax.transport import flow_matching_loss, sample_time


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def lr_schedule(lr: float, warmup_steps: int = 0, decay: str = "constant",
                decay_steps: int = 0, final_lr_fraction: float = 0.0):
    """Linear warmup from 0 (none if 0), then constant (upstream), 'cosine' or 'linear' decay
    to `final_lr_fraction` * lr at step `decay_steps` (counted from the start)."""
    if decay == "constant":
        after = optax.constant_schedule(lr)
    elif decay in ("cosine", "linear"):
        if decay_steps <= warmup_steps:
            raise ValueError(f"decay_steps={decay_steps} must exceed warmup_steps="
                             f"{warmup_steps} for a {decay} decay")
        n = decay_steps - warmup_steps
        after = (optax.cosine_decay_schedule(lr, n, alpha=final_lr_fraction) if decay == "cosine"
                 else optax.linear_schedule(lr, final_lr_fraction * lr, n))
    else:
        raise ValueError(f"unknown lr decay {decay!r}: constant, cosine, linear")
    if warmup_steps <= 0:
        return lr if decay == "constant" else after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after],
                                [warmup_steps])


def make_optimizer(lr: float = 2e-4, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.0, max_grad_norm: float | None = None,
                   warmup_steps: int = 0, decay: str = "constant", decay_steps: int = 0,
                   final_lr_fraction: float = 0.0) -> optax.GradientTransformation:
    """torch.optim.AdamW semantics (decoupled weight decay scaled by lr), optional global-norm
    clipping (upstream's ``max_grad_norm``), linear warmup and decay (`lr_schedule`; the
    defaults are upstream's constant lr)."""
    schedule = lr_schedule(lr, warmup_steps, decay, decay_steps, final_lr_fraction)
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if max_grad_norm:
        return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)
    return adamw


def init_train_state(model: nn.Module, optimizer: optax.GradientTransformation, rng: jax.Array,
                     *, batch_size: int = 1) -> TrainState:
    """A fresh state. Parameters keep their `nn.Partitioned` boxes (so does the optimizer
    state built from them): call under `jax.eval_shape` to read the logical sharding, and
    `nn.meta.unbox` the result before training (`launch.sharding.sharded_init` does both)."""
    s = model.input_size
    x = jnp.zeros((batch_size, s, s, model.in_channels), jnp.float32)
    t = jnp.zeros((batch_size,), jnp.float32)
    y = jnp.zeros((batch_size,), jnp.int32)
    params = model.init(rng, x, t, y)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=optimizer.init(params))


def loss_fn(params, model: nn.Module, x1, y, x0, t, *, train: bool = False,
            dropout_rng: jax.Array | None = None, drop_ids: jax.Array | None = None,
            use_cosine_loss: bool = True):
    """Flow-matching loss with given noise x0 (B, H, W, C) and times t (B,).

    Label dropout (train=True) is drawn inside the model from `dropout_rng`, or given as
    explicit (B,) 0/1 `drop_ids` (see `label_drop_ids`)."""
    rngs = {"label_dropout": dropout_rng} if train and dropout_rng is not None else None
    velocity = lambda xt, tt: model.apply({"params": params}, xt, tt, y, train=train, rngs=rngs,
                                          force_drop_ids=drop_ids)
    return flow_matching_loss(velocity, x1, x0, t, use_cosine_loss=use_cosine_loss)


def label_drop_ids(model: nn.Module, y: jax.Array, dropout_rng: jax.Array) -> jax.Array:
    """The (B,) 0/1 label-dropout decisions that ``model.apply(..., train=True,
    rngs={'label_dropout': dropout_rng})`` draws inside its `LabelEmbedder`.

    Same scope-derived key and same draw as `LabelEmbedder.__call__`, so the whole batch's
    decisions can be drawn once and sliced into micro-batches."""
    def draw(module, labels):
        embedder = module.y_embedder
        u = jax.random.uniform(embedder.make_rng("label_dropout"), labels.shape)
        return (u < embedder.dropout_prob).astype(jnp.int32)

    return model.apply({}, y, method=draw, rngs={"label_dropout": dropout_rng})


def _accumulate_grads(grad_fn, params, inputs: dict[str, jax.Array], accum_steps: int):
    """Mean gradients and loss terms over `accum_steps` equal micro-batches, one at a time.

    Micro-batch i holds samples i, i + k, i + 2k, ...: with the batch split over devices in
    contiguous blocks, every device keeps its own samples in every micro-batch."""
    def split(a):
        a = a.reshape((a.shape[0] // accum_steps, accum_steps) + a.shape[1:])
        return jnp.swapaxes(a, 0, 1)

    def body(acc, micro):
        (_, terms), grads = grad_fn(params, **micro)
        return jax.tree.map(jnp.add, acc, (grads, terms)), None

    # Sum in float32 whatever the parameter dtype, then average once.
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zero_terms = {name: jnp.zeros((), jnp.float32) for name in ("loss", "mse", "cos")}
    (grad_sum, term_sum), _ = jax.lax.scan(body, (zeros, zero_terms),
                                           jax.tree.map(split, inputs))
    grads = jax.tree.map(lambda g, p: (g / accum_steps).astype(p.dtype), grad_sum, params)
    terms = jax.tree.map(lambda v: v / accum_steps, term_sum)
    return grads, terms


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, optimizer: optax.GradientTransformation,
               ema_decay: float = 0.9999, time_dist: str = "logit_normal",
               use_cosine_loss: bool = True, accum_steps: int = 1,
               uniform_time_after: int = 0) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on ``batch = {'latents': (B, H, W, C), 'labels': (B,)}``.

    Randomness (noise, t, label dropout) is derived from `rng` folded with the step, so a
    restarted run replays the same stream. Returns the new state and scalar metrics.

    ``accum_steps = k > 1`` averages the gradients of k micro-batches of B / k (computed one
    after another, so only one micro-batch's activations are live) before the single optimiser
    and EMA update. Noise, t and label dropout are drawn for the whole batch exactly as for
    k = 1 and then split, so the result equals the k = 1 step up to float summation order.

    ``uniform_time_after = n > 0`` switches t to the uniform distribution from step n on (the
    released 800-epoch model turned logit-normal sampling off at 600k steps).
    """
    x1, y = batch["latents"], batch["labels"]
    if accum_steps < 1 or x1.shape[0] % accum_steps:
        raise ValueError(f"accum_steps={accum_steps} must be >= 1 and divide the batch size "
                         f"{x1.shape[0]}")
    key_noise, key_t, key_drop = jax.random.split(jax.random.fold_in(rng, state.step), 3)
    x0 = jax.random.normal(key_noise, x1.shape, x1.dtype)
    t = sample_time(key_t, x1.shape[0], kind=time_dist)
    if uniform_time_after > 0:
        uniform = sample_time(key_t, x1.shape[0], kind="uniform")
        t = jnp.where(state.step >= uniform_time_after, uniform, t)

    grad_fn = jax.value_and_grad(
        functools.partial(loss_fn, model=model, train=True, use_cosine_loss=use_cosine_loss),
        has_aux=True,
    )
    if accum_steps == 1:
        (_, terms), grads = grad_fn(state.params, x1=x1, y=y, x0=x0, t=t, dropout_rng=key_drop)
    else:
        inputs = {"x1": x1, "y": y, "x0": x0, "t": t,
                  "drop_ids": label_drop_ids(model, y, key_drop)}
        grads, terms = _accumulate_grads(grad_fn, state.params, inputs, accum_steps)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                              state.ema_params, params)
    metrics = {
        **terms,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "update_norm": optax.tree.norm(updates),
    }
    new_state = TrainState(step=state.step + 1, params=params, ema_params=ema_params,
                           opt_state=opt_state)
    return new_state, metrics
