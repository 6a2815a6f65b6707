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


def make_optimizer(lr: float = 2e-4, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.0, max_grad_norm: float | None = None,
                   warmup_steps: int = 0) -> optax.GradientTransformation:
    """torch.optim.AdamW semantics (decoupled weight decay scaled by lr), optional global-norm
    clipping (upstream's ``max_grad_norm``) and linear warmup (0 = constant lr, as upstream)."""
    schedule = (optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps > 0 else lr)
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
            dropout_rng: jax.Array | None = None, use_cosine_loss: bool = True):
    """Flow-matching loss with given noise x0 (B, H, W, C) and times t (B,)."""
    rngs = {"label_dropout": dropout_rng} if train else None
    velocity = lambda xt, tt: model.apply({"params": params}, xt, tt, y, train=train, rngs=rngs)
    return flow_matching_loss(velocity, x1, x0, t, use_cosine_loss=use_cosine_loss)


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, optimizer: optax.GradientTransformation,
               ema_decay: float = 0.9999, time_dist: str = "logit_normal",
               use_cosine_loss: bool = True) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on ``batch = {'latents': (B, H, W, C), 'labels': (B,)}``.

    Randomness (noise, t, label dropout) is derived from `rng` folded with the step, so a
    restarted run replays the same stream. Returns the new state and scalar metrics.
    """
    x1, y = batch["latents"], batch["labels"]
    key_noise, key_t, key_drop = jax.random.split(jax.random.fold_in(rng, state.step), 3)
    x0 = jax.random.normal(key_noise, x1.shape, x1.dtype)
    t = sample_time(key_t, x1.shape[0], kind=time_dist)

    grad_fn = jax.value_and_grad(
        functools.partial(loss_fn, model=model, train=True, use_cosine_loss=use_cosine_loss),
        has_aux=True,
    )
    (_, terms), grads = grad_fn(state.params, x1=x1, y=y, x0=x0, t=t, dropout_rng=key_drop)
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
