"""Upstream training checkpoints (weights, EMA, AdamW state) <-> TrainState.

torch's own AdamW runs 3 steps on a tiny upstream-layout model; after the import, one more step
with the same gradients must give the same weights and moments in torch and in optax.
"""

import jax
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util
from helpers import PARITY

from dit_jax import RELEASED_FLAGS, LightningDiT, lightningdit_kwargs
from dit_jax.convert import params_from_torch
from dit_jax.train_step import make_optimizer
from launch.training.torch_import import (
    adamw_hparams,
    train_state_from_torch,
    train_state_to_torch,
    upstream_parameter_rules,
)
from torchport import ConversionError

CASE = "dit_p2_qknorm1"
LR, BETAS, EPS = 2e-4, (0.9, 0.95), 1e-8
CONSTANTS = ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin")
OPTIMIZERS = {
    "upstream": {},
    "weight_decay": {"weight_decay": 0.01},
    "clip_warmup": {"max_grad_norm": 1.0, "warmup_steps": 10},
}


def _golden(golden):
    g = golden(CASE)
    return g.params, g.meta["config"]


def _upstream_model(state_dict: dict) -> torch.nn.Module:
    """A module with upstream's names, parameters and buffers, registered in state-dict order
    (so named_parameters() follows upstream's order); pos_embed is frozen as upstream."""
    root = torch.nn.Module()
    for key, value in state_dict.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]
        tensor = torch.tensor(np.asarray(value))
        if key.startswith("feat_rope."):
            module.register_buffer(leaf, tensor)
        else:
            module.register_parameter(leaf, torch.nn.Parameter(tensor, key != "pos_embed"))
    assert list(root.state_dict()) == list(state_dict)
    return root


def _random_grads(model: torch.nn.Module, rng: np.random.Generator) -> dict:
    return {name: torch.tensor(rng.standard_normal(p.shape, dtype=np.float32))
            for name, p in model.named_parameters() if p.requires_grad}


def _torch_step(model, opt, grads: dict, *, max_grad_norm=None, lr=None) -> None:
    for name, p in model.named_parameters():
        p.grad = grads[name].clone() if p.requires_grad else None
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if lr is not None:
        opt.param_groups[0]["lr"] = lr
    opt.step()


def _torch_run(sd: dict, weight_decay: float, steps: int = 3):
    """Model and AdamW after `steps` random steps, plus the next step's gradients."""
    model = _upstream_model(sd)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS,
                            weight_decay=weight_decay)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        _torch_step(model, opt, _random_grads(model, rng))
    return model, opt, _random_grads(model, rng)


def _flax(tensors: dict, sd: dict, cfg: dict) -> dict:
    """Torch-layout arrays of the trainable parameters -> a Flax tree (converter rules)."""
    return params_from_torch({**{k: sd[k] for k in CONSTANTS}, **tensors}, LightningDiT(**cfg))


def _moments(model, opt, key: str) -> dict:
    return {name: opt.state[p][key] for name, p in model.named_parameters() if p.requires_grad}


def _adam(opt_state) -> optax.ScaleByAdamState:
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    (adam,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
    return adam


def _assert_trees_close(got, want, name: str, *, rtol=1e-6, atol=1e-7) -> float:
    """Leaf-wise assert_allclose; records the largest abs error under `name` (PARITY)."""
    got, want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)
    assert set(got) == set(want)
    err = 0.0
    for path in want:
        g, w = np.asarray(got[path], np.float64), np.asarray(want[path], np.float64)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"{name} {path}")
        err = max(err, float(np.max(np.abs(g - w))))
    PARITY[name] = (err, atol, rtol)
    return err


def _save(tmp_path, model, opt) -> str:
    """Upstream's checkpoint dict; 'model' with DDP's module. prefix, 'ema' = weights + 1."""
    weights = model.state_dict()
    ema = {k: v if k in CONSTANTS else v + 1.0 for k, v in weights.items()}
    path = tmp_path / "0000003.pt"
    torch.save({"model": {"module." + k: v for k, v in weights.items()}, "ema": ema,
                "opt": opt.state_dict(), "config": {"optimizer": {"lr": LR}}}, path)
    return path


@pytest.mark.parametrize("variant", OPTIMIZERS)
def test_next_step_matches_torch(golden, tmp_path, variant):
    sd, cfg = _golden(golden)
    extra = OPTIMIZERS[variant]
    wd = extra.get("weight_decay", 0.0)
    config = {"lr": LR, "b1": BETAS[0], "b2": BETAS[1], "eps": EPS, "weight_decay": wd, **extra}
    model, opt, grads = _torch_run(sd, wd)
    path = _save(tmp_path, model, opt)

    state = train_state_from_torch(path, model_kwargs=cfg, optimizer_config=config)
    assert int(state.step) == 3 and int(_adam(state.opt_state).count) == 3
    ema = {k: v + 1 for k, v in model.state_dict().items() if k not in CONSTANTS}
    _assert_trees_close(state.ema_params, _flax(ema, sd, cfg), "ema_import", rtol=0, atol=0)

    # the 4th step on both sides; warmup: torch uses the lr optax's schedule gives at count 3
    warmup = config.get("warmup_steps", 0)
    lr = LR * 3 / warmup if warmup else None
    _torch_step(model, opt, grads, max_grad_norm=config.get("max_grad_norm"), lr=lr)
    optimizer = make_optimizer(**config)
    updates, opt_state = optimizer.update(_flax(grads, sd, cfg), state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    torch_params = _flax(dict(model.state_dict()), sd, cfg)
    err = _assert_trees_close(params, torch_params, f"adamw_step4_params[{variant}]")
    moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                             params, state.params)))
    assert err < 1e-2 * moved  # the step itself is reproduced, not just the old weights
    adam = _adam(opt_state)
    assert int(adam.count) == 4
    _assert_trees_close(adam.mu, _flax(_moments(model, opt, "exp_avg"), sd, cfg),
                        f"adamw_step4_mu[{variant}]")
    _assert_trees_close(adam.nu, _flax(_moments(model, opt, "exp_avg_sq"), sd, cfg),
                        f"adamw_step4_nu[{variant}]", atol=1e-12)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_round_trip_back_to_torch(golden, tmp_path, weight_decay):
    """import -> train_state_to_torch -> fresh torch AdamW: its next step is torch's own."""
    sd, cfg = _golden(golden)
    model, opt, grads = _torch_run(sd, weight_decay)
    state = train_state_from_torch(_save(tmp_path, model, opt), model_kwargs=cfg)
    exported = train_state_to_torch(state, model_kwargs=cfg, lr=LR, betas=BETAS, eps=EPS,
                                    weight_decay=weight_decay)
    assert set(exported) == {"model", "ema", "opt"}
    assert list(exported["model"]) == list(sd)
    step = exported["opt"]["state"][1]["step"]
    assert step.dtype == torch.float32 and step.ndim == 0 and float(step) == 3.0
    assert 0 not in exported["opt"]["state"]  # pos_embed: frozen, no state (as torch)
    assert exported["opt"]["param_groups"][0]["weight_decay"] == weight_decay

    fresh = _upstream_model({k: v * 0 for k, v in sd.items()})
    fresh.load_state_dict(exported["model"])  # strict
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=LR, betas=BETAS, eps=EPS,
                                  weight_decay=weight_decay)
    fresh_opt.load_state_dict(exported["opt"])
    _torch_step(fresh, fresh_opt, grads)
    _torch_step(model, opt, grads)
    for (name, a), (_, b) in zip(fresh.named_parameters(), model.named_parameters()):
        np.testing.assert_array_equal(a.detach().numpy(), b.detach().numpy(), err_msg=name)

    optimizer = make_optimizer(lr=LR, weight_decay=weight_decay)
    updates, _ = optimizer.update(_flax(grads, sd, cfg), state.opt_state, state.params)
    _assert_trees_close(optax.apply_updates(state.params, updates),
                        _flax(dict(fresh.state_dict()), sd, cfg),
                        f"round_trip_step[{weight_decay}]")


def test_parameter_order_matches_upstream_manifest(manifest, golden):
    """model.parameters() order (what torch's optimiser indices mean) = upstream's manifest."""
    entries = [e for e in manifest("LightningDiT_B_1")["state_dict"] if e["kind"] == "parameter"]
    rules = upstream_parameter_rules(lightningdit_kwargs("LightningDiT-B/1", **RELEASED_FLAGS))
    assert [r.torch_key for r in rules] == [e["key"] for e in entries]
    assert [r.flax_path is not None for r in rules] == [e["requires_grad"] for e in entries]

    sd, cfg = _golden(golden)
    names = [n for n, _ in _upstream_model(sd).named_parameters()]
    assert [r.torch_key for r in upstream_parameter_rules(cfg)] == names


def test_fresh_optimizer_and_hparams(golden):
    sd, cfg = _golden(golden)
    model = _upstream_model(sd)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=0)
    ckpt = {"model": model.state_dict(), "ema": model.state_dict(), "opt": opt.state_dict()}
    assert adamw_hparams(ckpt["opt"]) == {"lr": LR, "b1": 0.9, "b2": 0.95, "eps": EPS,
                                          "weight_decay": 0.0}
    state = train_state_from_torch(ckpt, model_kwargs=cfg, step=80_000)
    adam = _adam(state.opt_state)
    assert int(state.step) == 80_000 and int(adam.count) == 0
    assert all(not np.any(np.asarray(m)) for m in traverse_util.flatten_dict(adam.mu).values())
    with pytest.warns(UserWarning, match=r"lr: torch 0.0002, config 0.0001"):
        train_state_from_torch(ckpt, model_kwargs=cfg, optimizer_config={"lr": 1e-4})


def test_errors_are_readable(golden):
    sd, cfg = _golden(golden)
    model, opt, _ = _torch_run(sd, 0.0, steps=1)
    ckpt = {"model": model.state_dict(), "ema": model.state_dict(), "opt": opt.state_dict()}

    # an optimiser over a different parameter list (one parameter short)
    other = torch.optim.AdamW(list(model.parameters())[:-1], lr=LR)
    with pytest.raises(ConversionError, match=r"holds 40 parameters but upstream .* has 41"):
        train_state_from_torch({**ckpt, "opt": other.state_dict()}, model_kwargs=cfg)

    bad = opt.state_dict()
    index = [n for n, _ in model.named_parameters()].index("blocks.0.attn.qkv.weight")
    bad["state"][index]["exp_avg"] = torch.zeros(191, 64)
    with pytest.raises(ConversionError, match=r"(?s)exp_avg.*blocks\.0\.attn\.qkv\.weight: "
                                              r"got \(191, 64\), expected \(192, 64\)"):
        train_state_from_torch({**ckpt, "opt": bad}, model_kwargs=cfg)

    with pytest.raises(ValueError, match=r"missing \['opt'\]"):
        train_state_from_torch({"model": ckpt["model"], "ema": ckpt["ema"]}, model_kwargs=cfg)
