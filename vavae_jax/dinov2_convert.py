"""DINOv2 state dicts (timm / official torch.hub / transformers) <-> `vavae_jax.dinov2.DinoV2`.

One `Rule` per upstream key. Key names (block i; D = width, H = heads, hd = D / H; in the hf
column E. = embeddings., L. = encoder.layer.i.):

    Flax                        timm / torch_hub               hf (transformers 5.x)
    cls_token                   cls_token                      E.cls_token
    pos_embed                   pos_embed                      E.position_embeddings
    register_tokens             reg_token* / register_tokens   E.register_tokens
    patch_embed/kernel          patch_embed.proj.weight        E.patch_embeddings.projection.weight
    blocks_i/norm1/scale        blocks.i.norm1.weight          L.norm1.weight
    blocks_i/attn/qkv/kernel    blocks.i.attn.qkv.weight       L.attention.{q,k,v}_proj.weight
    blocks_i/attn/proj/kernel   blocks.i.attn.proj.weight      L.attention.o_proj.weight
    blocks_i/ls1/gamma          blocks.i.ls1.gamma             L.layer_scale1.lambda1
    blocks_i/mlp/fc1/kernel     blocks.i.mlp.fc1.weight        L.mlp.fc1.weight
    blocks_i/mlp/fc2/kernel     blocks.i.mlp.fc2.weight        L.mlp.fc2.weight
    norm/scale                  norm.weight                    layernorm.weight

(biases / LayerNorm biases alike). The SwiGLU FFN of ViT-g is mlp.fc1 / mlp.fc2 in timm,
mlp.w12 / mlp.w3 in torch_hub and mlp.weights_in / mlp.weights_out in transformers.

- timm: as loaded by upstream VA-VAE (also accepted under a training checkpoint's
  `foundation_model.model.` prefix). *timm's register models store `reg_token`, fold the CLS
  position into `cls_token` and keep no CLS slot in `pos_embed` (no_embed_class); the converter
  unfolds / folds that, so both layouts give the same features.
- torch_hub: the official facebookresearch/dinov2 `*_pretrain.pth` files: timm names plus
  `mask_token` (1, D) (ignored on load, written as zeros on export) and `register_tokens`.
- hf: transformers Dinov2Model / Dinov2WithRegistersModel with 5.x module names (q_proj, k_proj,
  v_proj, o_proj). hf_legacy: the names of transformers 4.x and of the HF-hub files
  (attention.attention.{query,key,value}, attention.output.dense). Both have
  `embeddings.mask_token` (handled like torch_hub's). HF keeps q, k, v as separate Linear layers;
  the table uses one synthetic key per block, e.g. `encoder.layer.0.attention.{q_proj,k_proj,
  v_proj}.weight`, which stands for the three entries stacked in [q; k; v] order (= timm's qkv).

Flax-side layouts: Linear (out, in) -> kernel (in, out); qkv (3D, D) -> (D, 3, H, hd);
proj (D, D) -> (H, hd, D); conv (D, 3, 14, 14) -> (14, 14, 3, D).

`model` defaults to `dinov2_model("L")`, the VA-VAE's ViT-L/14.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from torchport import (
    Rule,
    abstract_variables,
    conv_to_flax,
    conv_to_torch,
    linear_to_flax,
    linear_to_torch,
    load_state_dict,
    source_name,
    to_flax,
    to_torch,
)
from vavae_jax.dinov2 import DinoV2, dinov2_model

WHAT = "DINOv2"
LAYOUTS = ("timm", "torch_hub", "hf", "hf_legacy")
VAVAE_PREFIX = "foundation_model.model."  # the frozen DINOv2 inside a VA-VAE training checkpoint
MASK_TOKEN_KEYS = ("mask_token", "embeddings.mask_token")

_FUSED = re.compile(r"^(.*)\{([^}]+)\}(.*)$")  # "a.{q,k,v}.weight" -> "a.", "q,k,v", ".weight"


# ----------------------------------------------------------------------------------------------
# Key names per layout


def _top_names(layout: str) -> dict[str, str]:
    if layout in ("timm", "torch_hub"):
        return {
            "cls": "cls_token",
            "pos": "pos_embed",
            "reg": "reg_token" if layout == "timm" else "register_tokens",
            "mask": "mask_token",
            "patch": "patch_embed.proj",
            "norm": "norm",
        }
    return {
        "cls": "embeddings.cls_token",
        "pos": "embeddings.position_embeddings",
        "reg": "embeddings.register_tokens",
        "mask": "embeddings.mask_token",
        "patch": "embeddings.patch_embeddings.projection",
        "norm": "layernorm",
    }


def _block_names(layout: str, i: int, ffn: str) -> dict[str, str]:
    swiglu = ffn == "swiglu"
    if layout in ("timm", "torch_hub"):
        hub_swiglu = swiglu and layout == "torch_hub"
        return {
            "prefix": f"blocks.{i}.",
            "qkv": "attn.qkv",
            "proj": "attn.proj",
            "ls1": "ls1.gamma",
            "ls2": "ls2.gamma",
            "fc1": "mlp.w12" if hub_swiglu else "mlp.fc1",
            "fc2": "mlp.w3" if hub_swiglu else "mlp.fc2",
        }
    legacy = layout == "hf_legacy"
    return {
        "prefix": f"encoder.layer.{i}.",
        "qkv": "attention.attention.{query,key,value}"
        if legacy
        else "attention.{q_proj,k_proj,v_proj}",
        "proj": "attention.output.dense" if legacy else "attention.o_proj",
        "ls1": "layer_scale1.lambda1",
        "ls2": "layer_scale2.lambda1",
        "fc1": "mlp.weights_in" if swiglu else "mlp.fc1",
        "fc2": "mlp.weights_out" if swiglu else "mlp.fc2",
    }


# ----------------------------------------------------------------------------------------------
# Rule table


def _linear(name: str, path: tuple[str, ...]) -> list[Rule]:
    return [
        Rule(f"{name}.weight", (*path, "kernel"), linear_to_flax, linear_to_torch),
        Rule(f"{name}.bias", (*path, "bias")),
    ]


def _norm(name: str, path: tuple[str, ...]) -> list[Rule]:
    return [Rule(f"{name}.weight", (*path, "scale")), Rule(f"{name}.bias", (*path, "bias"))]


def _attention(qkv: str, proj: str, path: tuple[str, ...], heads: int) -> list[Rule]:
    # qkv weight rows are [q; k; v], each head-major (H, hd): (3D, D) <-> kernel (D, 3, H, hd).
    return [
        Rule(
            f"{qkv}.weight",
            (*path, "qkv", "kernel"),
            lambda w: w.reshape(3, heads, -1, w.shape[-1]).transpose(3, 0, 1, 2),
            lambda k: k.transpose(1, 2, 3, 0).reshape(-1, k.shape[0]),
        ),
        Rule(
            f"{qkv}.bias",
            (*path, "qkv", "bias"),
            lambda b: b.reshape(3, heads, -1),
            lambda b: b.reshape(-1),
        ),
        # proj (D, H * hd) <-> kernel (H, hd, D)
        Rule(
            f"{proj}.weight",
            (*path, "proj", "kernel"),
            lambda w: w.T.reshape(heads, -1, w.shape[0]),
            lambda k: k.reshape(-1, k.shape[-1]).T,
        ),
        Rule(f"{proj}.bias", (*path, "proj", "bias")),
    ]


def _layout_rules(
    layout: str,
    *,
    depth: int,
    num_heads: int,
    num_register_tokens: int = 0,
    ffn: str = "mlp",
    mask_token_dim: int | None = None,
) -> list[Rule]:
    """The table for one layout, in the layout's state-dict order.

    `mask_token_dim` adds the zero `mask_token` constant of torch_hub / hf files (export only).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown DINOv2 layout {layout!r}; expected one of {LAYOUTS}")
    top = _top_names(layout)
    timm_registers = layout == "timm" and num_register_tokens > 0
    if timm_registers:
        # no_embed_class: timm keeps no CLS slot in pos_embed (the CLS position is folded into
        # cls_token by `params_to_torch`); the Flax table keeps a zero slot.
        pos = Rule(
            top["pos"],
            ("pos_embed",),
            lambda w: np.concatenate([np.zeros_like(w[:, :1]), w], axis=1),
            lambda k: k[:, 1:],
        )
    else:
        pos = Rule(top["pos"], ("pos_embed",))
    mask = []
    if mask_token_dim is not None and layout != "timm":
        mask = [Rule(top["mask"], None, constant=np.zeros((1, mask_token_dim), np.float32))]
    reg = [Rule(top["reg"], ("register_tokens",))] if num_register_tokens else []

    # Parameter order of each implementation's module (= its state_dict order).
    if layout == "timm":
        rules = [Rule(top["cls"], ("cls_token",)), *reg, pos]
    elif layout == "torch_hub":
        rules = [Rule(top["cls"], ("cls_token",)), pos, *reg, *mask]
    else:
        rules = [Rule(top["cls"], ("cls_token",)), *mask, *reg, pos]
    rules += [
        Rule(f"{top['patch']}.weight", ("patch_embed", "kernel"), conv_to_flax, conv_to_torch),
        Rule(f"{top['patch']}.bias", ("patch_embed", "bias")),
    ]
    for i in range(depth):
        n = _block_names(layout, i, ffn)
        p, path = n["prefix"], (f"blocks_{i}",)
        rules += _norm(f"{p}norm1", (*path, "norm1"))
        rules += _attention(p + n["qkv"], p + n["proj"], (*path, "attn"), num_heads)
        rules.append(Rule(p + n["ls1"], (*path, "ls1", "gamma")))
        rules += _norm(f"{p}norm2", (*path, "norm2"))
        rules += _linear(p + n["fc1"], (*path, "mlp", "fc1"))
        rules += _linear(p + n["fc2"], (*path, "mlp", "fc2"))
        rules.append(Rule(p + n["ls2"], (*path, "ls2", "gamma")))
    rules += _norm(top["norm"], ("norm",))
    return rules


def torch_rules(model: DinoV2 | None = None, *, layout: str = "timm") -> list[Rule]:
    """The table of `model` in `layout`, in that layout's state-dict order; torch_hub / hf
    tables end their embeddings with the zero `mask_token` constant (exported, not loaded)."""
    model = dinov2_model() if model is None else model
    return _layout_rules(
        layout,
        depth=model.depth,
        num_heads=model.num_heads,
        num_register_tokens=model.num_register_tokens,
        ffn=model.ffn,
        mask_token_dim=model.embed_dim,
    )


def abstract_params(model: DinoV2 | None = None) -> dict:
    """The parameter tree as unboxed ShapeDtypeStructs (nothing allocated)."""
    model = dinov2_model() if model is None else model
    p = model.patch_size
    return abstract_variables(model, jax.ShapeDtypeStruct((1, p, p, 3), jnp.float32))


# ----------------------------------------------------------------------------------------------
# HF q/k/v: separate entries in the file, one synthetic stacked entry in the table


def _components(key: str) -> list[str] | None:
    m = _FUSED.match(key)
    if m is None:
        return None
    head, names, tail = m.groups()
    return [f"{head}{name}{tail}" for name in names.split(",")]


def _stack_qkv(state_dict: Mapping[str, Any], rules: list[Rule]) -> dict[str, Any]:
    """Replace q / k / v entries by the synthetic stacked keys of `rules`.

    Stacks only when all three parts are present with the same shape; otherwise the parts stay
    (and the validation reports them as unexpected and the stacked key as missing).
    """
    out = dict(state_dict)
    for rule in rules:
        parts = _components(rule.torch_key)
        if parts is None or not all(k in out for k in parts):
            continue
        arrays = [np.asarray(out[k]) for k in parts]
        if len({a.shape for a in arrays}) != 1:
            continue
        for k in parts:
            del out[k]
        out[rule.torch_key] = np.concatenate(arrays, axis=0)
    return out


def _unstack_qkv(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `_stack_qkv`, emitting q.weight, q.bias, k.weight, ... in HF order."""
    out: dict[str, Any] = {}
    pending: dict[str, Any] = {}  # stacked weights waiting for their bias
    for key, value in state_dict.items():
        parts = _components(key)
        if parts is None:
            out[key] = value
        elif key.endswith(".weight"):
            pending[key] = value
        else:
            weight_key = key[: -len(".bias")] + ".weight"
            weights = np.split(np.asarray(pending.pop(weight_key)), len(parts), axis=0)
            biases = np.split(np.asarray(value), len(parts), axis=-1)
            for bias_key, w, b in zip(parts, weights, biases):
                out[bias_key[: -len(".bias")] + ".weight"] = w
                out[bias_key] = b
    assert not pending, f"stacked q/k/v weights without biases: {sorted(pending)}"
    return out


# ----------------------------------------------------------------------------------------------
# Public API


def detect_layout(keys) -> str:
    """Guess the layout of a DINOv2 state dict from its key names."""
    keys = list(keys)
    if any(k.startswith("embeddings.") for k in keys):
        return "hf_legacy" if any(".attention.attention." in k for k in keys) else "hf"
    if "reg_token" in keys:
        return "timm"
    if "mask_token" in keys or "register_tokens" in keys or any(".mlp.w12." in k for k in keys):
        return "torch_hub"
    return "timm"


def params_from_torch(
    source: str | os.PathLike | Mapping[str, Any],
    model: DinoV2 | None = None,
    *,
    layout: str | None = None,
    prefix: str | None = None,
) -> dict:
    """Load DINOv2 weights into a Flax parameter tree for `model` (default ViT-L/14).

    Args:
      source: a checkpoint file or a state-dict mapping (see `torchport.load_state_dict`); a
        Lightning checkpoint's `state_dict` entry is used when present.
      model: the `DinoV2` to load into; its config decides the expected keys and shapes.
      layout: 'timm', 'torch_hub', 'hf' or 'hf_legacy'; detected from the key names if None.
      prefix: the model's key prefix inside a larger checkpoint, used when present. Default:
        `foundation_model.model.` (the frozen DINOv2 of a VA-VAE training checkpoint).

    Raises:
      ConversionError listing every missing, unexpected and mis-shaped key. `mask_token` is
      always ignored (it only matters for masked training).
    """
    model = dinov2_model() if model is None else model
    name = source_name(source)
    state_dict = load_state_dict(source, select=("state_dict",), under=prefix or VAVAE_PREFIX)
    layout = layout or detect_layout(state_dict)
    rules = [r for r in torch_rules(model, layout=layout) if r.torch_key not in MASK_TOKEN_KEYS]
    if layout in ("hf", "hf_legacy"):
        state_dict = _stack_qkv(state_dict, rules)
    state_dict = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    return to_flax(
        state_dict,
        rules,
        abstract_params(model),
        what=f"{WHAT} ({layout} layout)",
        source=name,
        ignore=lambda k: k in MASK_TOKEN_KEYS,
    )


def params_to_torch(
    params: Mapping, model: DinoV2 | None = None, *, layout: str = "timm"
) -> dict[str, Any]:
    """Flax parameters -> upstream state dict {key: np.ndarray (float32)} in `layout`.

    torch_hub / hf outputs include a zero `mask_token`, so the official / transformers modules
    load them with strict=True. Abstract trees (`abstract_params(model)`) give
    {key: ShapeDtypeStruct} without allocating.
    """
    model = dinov2_model() if model is None else model
    params = nn.meta.unbox(params)
    if set(params) == {"params"}:
        params = params["params"]
    flat = traverse_util.flatten_dict(dict(params))
    abstract = any(isinstance(v, jax.ShapeDtypeStruct) for v in flat.values())
    if not abstract and layout == "timm" and model.num_register_tokens > 0:
        # fold the CLS position into cls_token (timm no_embed_class)
        flat = dict(flat)
        flat[("cls_token",)] = (
            np.asarray(flat[("cls_token",)]) + np.asarray(flat[("pos_embed",)])[:, :1]
        )
    out = to_torch(traverse_util.unflatten_dict(flat), torch_rules(model, layout=layout),
                   what=WHAT)
    if not abstract:
        out = {k: np.asarray(v, np.float32) for k, v in out.items()}
    if layout in ("hf", "hf_legacy"):
        out = _unstack_abstract(out) if abstract else _unstack_qkv(out)
    return out


def _unstack_abstract(shapes: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, Any]:
    concrete = {k: np.broadcast_to(np.float32(0), s.shape) for k, s in shapes.items()}
    return {
        k: jax.ShapeDtypeStruct(np.shape(v), jnp.float32) for k, v in _unstack_qkv(concrete).items()
    }
