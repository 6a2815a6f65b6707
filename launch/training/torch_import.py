"""Move a LightningDiT training run between upstream PyTorch and JAX, AdamW state included.

    state = train_state_from_torch("0080000.pt", model_kwargs=kwargs,
                                   optimizer_config=config.optimizer)
    ckpt = train_state_to_torch(state, model_kwargs=kwargs)   # {'model', 'ema', 'opt'}
    torch.save(ckpt, "0080000.pt")  # model.load_state_dict / opt.load_state_dict upstream

Upstream train.py saves ``{'model', 'ema', 'opt': AdamW.state_dict(), 'config'}``. Torch keys
the optimiser state by position in ``model.parameters()``; that order is the state-dict order
without the RoPE buffers (`pos_embed` is a frozen nn.Parameter: it takes a slot but never gets
state). Moments are converted with the same layout rules as the weights they belong to.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from dit_jax.convert import abstract_params, params_from_torch, params_to_torch, torch_rules
from dit_jax.model import LightningDiT
from dit_jax.train_step import TrainState, make_optimizer
from torchport import (
    ConversionError,
    Rule,
    load_state_dict,
    read_checkpoint,
    source_name,
    to_flax,
    to_torch,
)

# Upstream registers only the RoPE tables as buffers; every other state-dict entry is an
# nn.Parameter. state_dict() lists a module's parameters, then its buffers, then its children,
# and named_parameters() the same minus buffers: dropping buffers gives the parameter order.
UPSTREAM_BUFFER_PREFIXES = ("feat_rope.",)
_HPARAMS = ("lr", "b1", "b2", "eps", "weight_decay")
_FILLED_STATES = (optax.ScaleByAdamState, optax.ScaleByScheduleState)


def upstream_parameter_rules(model_kwargs: Mapping[str, Any]) -> list[Rule]:
    """Conversion rules of upstream's ``model.parameters()``, in that order (with pos_embed)."""
    rules = torch_rules(LightningDiT(**model_kwargs))
    return [r for r in rules if not r.torch_key.startswith(UPSTREAM_BUFFER_PREFIXES)]


def adamw_hparams(opt_state_dict: Mapping[str, Any]) -> dict[str, float]:
    """`make_optimizer` keyword arguments read from a torch AdamW ``state_dict()``."""
    groups = opt_state_dict.get("param_groups") or []
    if len(groups) != 1:
        raise ConversionError(
            f"expected one AdamW parameter group (as upstream), got {len(groups)}")
    g = groups[0]
    if g.get("amsgrad") or g.get("maximize"):
        raise ConversionError("AdamW with amsgrad/maximize has no optax counterpart here")
    b1, b2 = g["betas"]
    return {"lr": float(g["lr"]), "b1": float(b1), "b2": float(b2), "eps": float(g["eps"]),
            "weight_decay": float(g["weight_decay"])}


def _check_hparams(torch_hp: Mapping[str, float], config: Mapping[str, Any], name: str) -> None:
    """Warn (not fail) where the run's JAX optimiser config differs from what torch used."""
    diffs = [f"{k}: torch {torch_hp[k]:g}, config {float(config[k]):g}" for k in _HPARAMS
             if k in config and not math.isclose(torch_hp[k], float(config[k]), rel_tol=1e-6)]
    if diffs:
        warnings.warn(f"{name}: the optimiser config differs from the checkpoint's AdamW "
                      f"param_groups ({'; '.join(diffs)}); the config is used", stacklevel=3)


def _read(source: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    return read_checkpoint(os.fspath(source))


def _adam_moments(opt_sd: Mapping[str, Any], rules: list[Rule], model_kwargs: Mapping[str, Any],
                  name: str) -> tuple[int, dict | None, dict | None]:
    """(step, mu, nu) in Flax layout from torch's index-keyed state; (0, None, None) if empty."""
    model_name = f"LightningDiT({', '.join(f'{k}={v}' for k, v in model_kwargs.items())})"
    ids = list(opt_sd["param_groups"][0]["params"])
    if len(ids) != len(rules):
        raise ConversionError(
            f"{name}: the optimiser holds {len(ids)} parameters but upstream {model_name} has "
            f"{len(rules)} (first {rules[0].torch_key}, last {rules[-1].torch_key}): an "
            f"optimiser of another model or configuration?")
    names = opt_sd["param_groups"][0].get("param_names")  # only with named_parameters()
    if names is not None:
        bad = [f"{n} != {r.torch_key}" for n, r in zip(names, rules)
               if n.removeprefix("module.") != r.torch_key]
        if bad:
            raise ConversionError(f"{name}: optimiser parameter names differ: {bad[:5]}")

    states = opt_sd.get("state") or {}
    trainable = [(i, r) for i, r in zip(ids, rules) if r.flax_path is not None]
    frozen_with_state = [r.torch_key for i, r in zip(ids, rules) if r.flax_path is None
                         and i in states]
    if frozen_with_state:
        warnings.warn(f"{name}: ignoring optimiser state of {frozen_with_state} (fixed here)",
                      stacklevel=3)
    stateless = [r.torch_key for i, r in trainable if i not in states]
    if len(stateless) == len(trainable):  # never stepped: the optax init is already right
        return 0, None, None
    if stateless:
        raise ConversionError(f"{name}: AdamW state missing for {len(stateless)} parameters "
                              f"({stateless[:5]}); optax keeps one step count for all")
    steps = sorted({float(np.asarray(states[i]["step"])) for i, _ in trainable})
    if len(steps) != 1:
        raise ConversionError(f"{name}: parameters were stepped different times ({steps})")

    # exp_avg / exp_avg_sq have their parameter's layout, so the weight rules convert them.
    shapes = abstract_params(LightningDiT(**model_kwargs))
    moment_rules = [r for _, r in trainable]
    mu, nu = (
        to_flax(load_state_dict({r.torch_key: states[i][key] for i, r in trainable}),
                moment_rules, shapes, what=f"the AdamW moments of {model_name}",
                source=f"{name} 'opt' {key}")
        for key in ("exp_avg", "exp_avg_sq"))
    return int(steps[0]), mu, nu


def _adam_states(opt_state: Any) -> list[optax.ScaleByAdamState]:
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]


def train_state_from_torch(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    model_kwargs: Mapping[str, Any],
    step: int | None = None,
    optimizer: optax.GradientTransformation | None = None,
    optimizer_config: Mapping[str, Any] | None = None,
) -> TrainState:
    """Upstream training checkpoint (``.pt`` or mapping) -> `TrainState`.

    Args:
      source: ``{'model', 'ema', 'opt', ...}`` as upstream train.py saves it.
      model_kwargs: `LightningDiT` constructor arguments of the checkpoint.
      step: the run's step (upstream: the file name); default the AdamW step. They differ
        after an upstream resume, which restores weights but not the optimiser.
      optimizer: the optax transformation the run continues with; default
        ``make_optimizer(**optimizer_config)``, or the checkpoint's hyper-parameters.
      optimizer_config: `make_optimizer` kwargs (e.g. ``config.optimizer``); compared with the
        checkpoint's param_groups, differences are warned about.

    Every `ScaleByAdamState` in the optimiser state gets torch's (step, exp_avg, exp_avg_sq);
    schedule counts get the step too, so a warmup continues instead of restarting. Other
    states (clipping, weight decay) are stateless and keep their init.
    """
    name = source_name(source)
    raw = _read(source)
    missing = [k for k in ("model", "ema", "opt") if not isinstance(raw.get(k), Mapping)]
    if missing:
        raise ValueError(f"{name}: not an upstream training checkpoint, missing {missing} "
                         f"(top-level keys: {sorted(map(str, raw))[:10]})")
    model = LightningDiT(**model_kwargs)
    params = params_from_torch(raw, model, select=("model",))
    ema_params = params_from_torch(raw, model, select=("ema",))

    torch_hp = adamw_hparams(raw["opt"])
    if optimizer_config is not None:
        _check_hparams(torch_hp, optimizer_config, name)
    if optimizer is None:
        optimizer = make_optimizer(**dict(optimizer_config or torch_hp))

    count, mu, nu = _adam_moments(raw["opt"], upstream_parameter_rules(model_kwargs),
                                  model_kwargs, name)
    params = jax.tree.map(jnp.asarray, params)
    opt_state = optimizer.init(params)
    if not _adam_states(opt_state):
        raise ValueError("the optimizer has no optax ScaleByAdamState to fill (not Adam/AdamW?)")

    def fill(node):
        if isinstance(node, optax.ScaleByAdamState) and mu is not None:
            as_jax = lambda t: jax.tree.map(jnp.asarray, t)
            return node._replace(count=jnp.asarray(count, node.count.dtype), mu=as_jax(mu),
                                 nu=as_jax(nu))
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=jnp.asarray(count, node.count.dtype))
        return node

    opt_state = jax.tree.map(fill, opt_state,
                             is_leaf=lambda x: isinstance(x, _FILLED_STATES))
    return TrainState(step=jnp.asarray(count if step is None else step, jnp.int32),
                      params=params, ema_params=jax.tree.map(jnp.asarray, ema_params),
                      opt_state=opt_state)


def train_state_to_torch(state: TrainState, *, model_kwargs: Mapping[str, Any],
                         lr: float = 2e-4, betas: tuple[float, float] = (0.9, 0.95),
                         eps: float = 1e-8, weight_decay: float = 0.0) -> dict[str, Any]:
    """`TrainState` -> ``{'model', 'ema', 'opt'}`` with torch tensors, as upstream saves it.

    ``opt`` loads into ``torch.optim.AdamW(model.parameters(), ...)``; its hyper-parameters
    are the arguments here (optax closes over its own, so they cannot be read back).
    """
    import torch

    adams = _adam_states(state.opt_state)
    if len(adams) != 1:
        raise ValueError(f"expected exactly one optax ScaleByAdamState, found {len(adams)}")
    adam = nn.meta.unbox(adams[0])
    count = int(adam.count)
    rules = upstream_parameter_rules(model_kwargs)
    as_tensor = lambda a: torch.from_numpy(np.array(a, np.float32))

    opt_state = {}
    if count > 0:  # torch creates a parameter's state on its first step
        trainable = [r for r in rules if r.flax_path is not None]
        what = "LightningDiT AdamW state"
        mu, nu = (to_torch(m, trainable, what=what) for m in (adam.mu, adam.nu))
        for i, rule in enumerate(rules):
            if rule.flax_path is not None:
                # torch 2.x keeps `step` as a float32 scalar tensor (non-capturable AdamW)
                opt_state[i] = {"step": torch.tensor(float(count), dtype=torch.float32),
                                "exp_avg": as_tensor(mu[rule.torch_key]),
                                "exp_avg_sq": as_tensor(nu[rule.torch_key])}
    # This torch version's group defaults (foreach, fused, decoupled_weight_decay, ...).
    dummy = torch.zeros(0, requires_grad=True)
    group = torch.optim.AdamW([dummy], lr=lr, betas=betas, eps=eps,
                              weight_decay=weight_decay).state_dict()["param_groups"][0]
    group["params"] = list(range(len(rules)))

    to_tensors = lambda sd: {k: as_tensor(v) for k, v in sd.items()}
    model = LightningDiT(**model_kwargs)
    return {"model": to_tensors(params_to_torch(state.params, model)),
            "ema": to_tensors(params_to_torch(state.ema_params, model)),
            "opt": {"state": opt_state, "param_groups": [group]}}
