"""LightningDiT weights: upstream PyTorch state dict <-> Flax params.

    model = LightningDiT(**lightningdit_kwargs("LightningDiT-XL/1", **RELEASED_FLAGS))
    params = params_from_torch("lightningdit-xl-imagenet256-800ep.pt", model)
    state_dict = params_to_torch(params, model)   # loads with strict=True upstream

`model` defaults to that released XL/1 configuration. Upstream training checkpoints
(``{'model', 'ema', 'opt', 'config'}``) load their 'ema' entry, as upstream inference.py does
(pass ``select=("model",)`` for the raw weights). `pos_embed` and the RoPE buffers are
constants here: exported with upstream's values, checked on import.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from dit_jax.layers import rope_tables, sincos_pos_embed_2d
from dit_jax.model import RELEASED_FLAGS, LightningDiT, lightningdit_kwargs, swiglu_hidden_size
from torchport import (
    Rule,
    abstract_variables,
    conv_to_flax,
    conv_to_torch,
    linear_to_flax,
    linear_to_torch,
    load_state_dict,
    save_state_dict,
    source_name,
    to_flax,
    to_torch,
    to_torch_tensor,
)

# Keys a LightningDiT training checkpoint may wrap the weights in, in order of preference.
DEFAULT_SELECT = ("ema", "model", "state_dict")

# How far an upstream `ema` entry's pos_embed may be from the exact table. Upstream's
# update_ema also averages the frozen pos_embed (``ema.mul_(d).add_(p, alpha=1 - d)``), whose
# float32 rounding moves it by up to ~1.7e-4 (decay 0.9999, values in [-1, 1]) after a few
# thousand steps; a table of another layout differs by O(1).
POS_EMBED_ATOL = 1e-3


def default_model() -> LightningDiT:
    """The released checkpoints' model: LightningDiT-XL/1 on 16x16x32 VA-VAE latents."""
    return LightningDiT(**lightningdit_kwargs("LightningDiT-XL/1", **RELEASED_FLAGS))


def _split_linear(chunks: tuple[int, ...]) -> tuple[Any, Any]:
    """Linear weight (prod(chunks), in) <-> kernel (in, *chunks); bias (prod,) <-> (*chunks,)."""

    def w_to_flax(w):
        return w.T.reshape(w.shape[1], *chunks)

    def w_to_torch(k):
        return k.reshape(k.shape[0], -1).T

    return w_to_flax, w_to_torch


def _bias(chunks: tuple[int, ...]) -> tuple[Any, Any]:
    return (lambda b: b.reshape(chunks)), (lambda b: b.reshape(-1))


def _merged_linear(in_chunks: tuple[int, ...]) -> tuple[Any, Any]:
    """Linear weight (out, prod(in_chunks)) <-> kernel (*in_chunks, out) (attention proj)."""

    def w_to_flax(w):
        return w.T.reshape(*in_chunks, w.shape[0])

    def w_to_torch(k):
        return k.reshape(-1, k.shape[-1]).T

    return w_to_flax, w_to_torch


def torch_rules(model: LightningDiT | None = None) -> list[Rule]:
    """One rule per upstream state-dict entry, in upstream registration order."""
    model = default_model() if model is None else model
    d, h = model.hidden_size, model.num_heads
    hd = d // h
    rules: list[Rule] = []

    def linear(torch_prefix: str, path: tuple[str, ...]):
        rules.append(Rule(f"{torch_prefix}.weight", (*path, "kernel"), linear_to_flax,
                          linear_to_torch))
        rules.append(Rule(f"{torch_prefix}.bias", (*path, "bias")))

    def chunked(torch_prefix: str, path: tuple[str, ...], chunks: tuple[int, ...]):
        rules.append(Rule(f"{torch_prefix}.weight", (*path, "kernel"), *_split_linear(chunks)))
        rules.append(Rule(f"{torch_prefix}.bias", (*path, "bias"), *_bias(chunks)))

    def norm(torch_prefix: str, path: tuple[str, ...], with_bias: bool):
        rules.append(Rule(f"{torch_prefix}.weight", (*path, "scale")))
        if with_bias:
            rules.append(Rule(f"{torch_prefix}.bias", (*path, "bias")))

    pos = sincos_pos_embed_2d(d, model.grid_size)[None]
    rules.append(Rule("pos_embed", None, constant=pos, constant_atol=POS_EMBED_ATOL))
    rules.append(Rule("x_embedder.proj.weight", ("x_embedder", "kernel"), conv_to_flax,
                      conv_to_torch))
    rules.append(Rule("x_embedder.proj.bias", ("x_embedder", "bias")))
    linear("t_embedder.mlp.0", ("t_embedder", "mlp_0"))
    linear("t_embedder.mlp.2", ("t_embedder", "mlp_2"))
    rules.append(Rule("y_embedder.embedding_table.weight", ("y_embedder", "embedding_table")))
    if model.use_rope:
        cos, sin = rope_tables(hd, model.grid_size)
        rules.append(Rule("feat_rope.freqs_cos", None, constant=cos))
        rules.append(Rule("feat_rope.freqs_sin", None, constant=sin))

    for i in range(model.depth):
        tp, fp = f"blocks.{i}", (f"blocks_{i}",)
        if model.use_rmsnorm:
            norm(f"{tp}.norm1", (*fp, "norm1"), with_bias=False)
            norm(f"{tp}.norm2", (*fp, "norm2"), with_bias=False)
        chunked(f"{tp}.attn.qkv", (*fp, "attn", "qkv"), (3, h, hd))
        if model.use_qknorm:
            for qk in ("q_norm", "k_norm"):
                norm(f"{tp}.attn.{qk}", (*fp, "attn", qk), with_bias=not model.use_rmsnorm)
        rules.append(Rule(f"{tp}.attn.proj.weight", (*fp, "attn", "proj", "kernel"),
                          *_merged_linear((h, hd))))
        rules.append(Rule(f"{tp}.attn.proj.bias", (*fp, "attn", "proj", "bias")))
        if model.use_swiglu:
            hidden = swiglu_hidden_size(d, model.mlp_ratio)
            chunked(f"{tp}.mlp.w12", (*fp, "mlp", "w12"), (2, hidden))
            linear(f"{tp}.mlp.w3", (*fp, "mlp", "w3"))
        else:
            linear(f"{tp}.mlp.fc1", (*fp, "mlp", "fc1"))
            linear(f"{tp}.mlp.fc2", (*fp, "mlp", "fc2"))
        n_mod = 4 if model.wo_shift else 6
        chunked(f"{tp}.adaLN_modulation.1", (*fp, "adaLN_modulation"), (n_mod, d))

    if model.use_rmsnorm:
        norm("final_layer.norm_final", ("final_layer", "norm_final"), with_bias=False)
    linear("final_layer.linear", ("final_layer", "linear"))
    chunked("final_layer.adaLN_modulation.1", ("final_layer", "adaLN_modulation"), (2, d))
    return rules


def abstract_params(model: LightningDiT | None = None) -> dict:
    """Flax parameter shapes (ShapeDtypeStructs, unboxed) without allocating anything."""
    model = default_model() if model is None else model
    s = model.input_size
    x = jax.ShapeDtypeStruct((1, s, s, model.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    return abstract_variables(model, x, t, y)


def params_from_torch(
    source: str | os.PathLike | Mapping[str, Any],
    model: LightningDiT | None = None,
    *,
    select: Sequence[str] = DEFAULT_SELECT,
) -> dict:
    """Upstream state dict (file or mapping of numpy arrays / torch tensors) -> Flax params.

    `model` describes the checkpoint (default: `default_model()`); `select`: which sub-dict of
    a training checkpoint to read, first present wins. Raises `torchport.ConversionError`
    listing every missing, unexpected or mis-shaped key.
    """
    model = default_model() if model is None else model
    state_dict = load_state_dict(source, select=select)
    params = to_flax(state_dict, torch_rules(model), abstract_params(model),
                     what=_describe(model), source=source_name(source))
    return jax.tree.map(lambda a: np.asarray(a, model.param_dtype), params)


def params_to_torch(params: Mapping, model: LightningDiT | None = None) -> dict[str, np.ndarray]:
    """Flax params -> upstream state dict (numpy, upstream key order, incl. pos_embed / RoPE)."""
    model = default_model() if model is None else model
    return to_torch(nn.meta.unbox(params), torch_rules(model), what=_describe(model))


def save_torch_checkpoint(path: str | os.PathLike, params: Mapping,
                          model: LightningDiT | None = None, *, ema_params=None) -> None:
    """Write a `.pt` upstream inference.py / train.py can read (``{'model', 'ema'}``; 'ema' is
    `params` unless `ema_params` is given) or a flat `.safetensors` of `params`."""
    model_sd = params_to_torch(params, model)
    if os.fspath(path).endswith(".safetensors"):
        save_state_dict(path, model_sd)
        return
    import torch

    to_t = lambda sd: {k: to_torch_tensor(v) for k, v in sd.items()}
    model_t = to_t(model_sd)
    ema_t = to_t(params_to_torch(ema_params, model)) if ema_params is not None else model_t
    torch.save({"model": model_t, "ema": ema_t}, os.fspath(path))


def _describe(model: LightningDiT) -> str:
    flags = [f for f in ("use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift",
                         "learn_sigma") if getattr(model, f)]
    return (f"LightningDiT(depth={model.depth}, hidden_size={model.hidden_size}, "
            f"num_heads={model.num_heads}, patch_size={model.patch_size}, "
            f"input_size={model.input_size}, in_channels={model.in_channels}"
            + "".join(f", {f}=True" for f in flags) + ")")
