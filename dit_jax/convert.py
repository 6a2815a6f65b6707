"""LightningDiT weights: upstream PyTorch state dict <-> Flax params.

    params = params_from_torch("lightningdit-xl-imagenet256-800ep.pt",
                               **lightningdit_kwargs("LightningDiT-XL/1", **RELEASED_FLAGS))
    state_dict = params_to_torch(params, **same_kwargs)   # loads with strict=True upstream

Upstream training checkpoints (``{'model', 'ema', 'opt', 'config'}``) load their 'ema' entry,
as upstream inference.py does (pass ``select=("model",)`` for the raw weights). `pos_embed` and
the RoPE buffers are constants here: exported with upstream's values, checked on import.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from dit_jax.layers import rope_tables, sincos_pos_embed_2d
from dit_jax.model import LightningDiT, swiglu_hidden_size
from torchport import (
    Rule,
    conv_to_flax,
    conv_to_torch,
    linear_to_flax,
    linear_to_torch,
    load_state_dict,
    save_state_dict,
    source_name,
    to_flax,
    to_torch,
)

# Keys a LightningDiT training checkpoint may wrap the weights in, in order of preference.
DEFAULT_SELECT = ("ema", "model", "state_dict")


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


def conversion_rules(model: LightningDiT) -> list[Rule]:
    """One rule per upstream state-dict entry, in upstream registration order."""
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
    rules.append(Rule("pos_embed", None, constant=pos))
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


def abstract_params(model: LightningDiT) -> dict:
    """Flax parameter shapes (ShapeDtypeStructs, unboxed) without allocating anything."""
    s = model.input_size
    x = jax.ShapeDtypeStruct((1, s, s, model.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
    return nn.meta.unbox(variables["params"])


def params_from_torch(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    select: Sequence[str] = DEFAULT_SELECT,
    **model_kwargs,
) -> dict:
    """Upstream state dict (file or mapping of numpy arrays / torch tensors) -> Flax params.

    `model_kwargs` are `LightningDiT` constructor arguments describing the checkpoint.
    Raises `torchport.ConversionError` listing every missing, unexpected or mis-shaped key.
    """
    model = LightningDiT(**model_kwargs)
    state_dict = load_state_dict(source, select=select)
    shapes = traverse_util.flatten_dict(abstract_params(model))
    name = source_name(source)
    params = to_flax(state_dict, conversion_rules(model), shapes, what=_describe(model),
                     source=name)
    return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def params_to_torch(params: Mapping, **model_kwargs) -> dict[str, np.ndarray]:
    """Flax params -> upstream state dict (numpy, upstream key order, incl. pos_embed / RoPE)."""
    model = LightningDiT(**model_kwargs)
    return to_torch(nn.meta.unbox(params), conversion_rules(model), what=_describe(model))


def save_torch_checkpoint(path: str | os.PathLike, params: Mapping, *, ema_params=None,
                          **model_kwargs) -> None:
    """Write a `.pt` upstream inference.py / train.py can read (``{'model', 'ema'}``) or a flat
    `.safetensors` of `params`."""
    model_sd = params_to_torch(params, **model_kwargs)
    if os.fspath(path).endswith(".safetensors"):
        save_state_dict(path, model_sd)
        return
    import torch

    to_t = lambda sd: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    ema_sd = params_to_torch(ema_params, **model_kwargs) if ema_params is not None else model_sd
    torch.save({"model": to_t(model_sd), "ema": to_t(ema_sd)}, os.fspath(path))


def _describe(model: LightningDiT) -> str:
    flags = [f for f in ("use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift",
                         "learn_sigma") if getattr(model, f)]
    return (f"LightningDiT(depth={model.depth}, hidden_size={model.hidden_size}, "
            f"num_heads={model.num_heads}, patch_size={model.patch_size}, "
            f"input_size={model.input_size}, in_channels={model.in_channels}"
            + "".join(f", {f}=True" for f in flags) + ")")
