"""Upstream VA-VAE state dicts <-> Flax parameters of `vavae_jax.autoencoder.AutoencoderKL`.

The table has one `Rule` per upstream key, generated in PyTorch registration order from the same
level layout the Flax modules use (`encoder_levels` / `decoder_levels`), e.g.

    encoder.down.2.block.0.nin_shortcut.weight (out, in, 1, 1)
        <-> encoder/down_2/block_0/nin_shortcut/kernel (1, 1, in, out)
    decoder.up.4.attn.1.norm.weight (C,) <-> decoder/up_4/attn_1/norm/scale (C,)

`model` defaults to upstream's f16d32 `AutoencoderKL()`. Checkpoints accepted by
`params_from_torch` (SPEC 5.7 / 5.8):
- the inference state dict (encoder.*, decoder.*, quant_conv.*, post_quant_conv.*);
- a Lightning checkpoint of the training module, i.e. the same wrapped as ``{'state_dict': ...}``
  and/or with the training extras ``foundation_model.*`` and ``loss.*`` (always skipped) and
  ``linear_proj.weight`` (kept when the model has `use_vf` or when asked to, skipped otherwise).
Any other unknown key, a missing key or a shape mismatch raises `ConversionError`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from torchport import (
    ConversionError,
    Rule,
    abstract_variables,
    conv_to_flax,
    conv_to_torch,
    load_state_dict,
    source_name,
    to_flax,
    to_torch,
)
from vavae_jax.autoencoder import AutoencoderKL
from vavae_jax.blocks import decoder_levels, encoder_levels

WHAT = "VA-VAE AutoencoderKL"

# Parts of the training module that are not part of the autoencoder: the frozen DINOv2 and the
# loss module (LPIPS, discriminator, logvar).
TRAINING_EXTRA_PREFIXES = ("foundation_model.", "loss.")
VF_PROJ_KEY = "linear_proj.weight"


# ----------------------------------------------------------------------------------------------
# Rule table


def _conv(torch_name: str, flax_path: tuple[str, ...], bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{torch_name}.weight", (*flax_path, "kernel"), conv_to_flax, conv_to_torch)]
    if bias:
        rules.append(Rule(f"{torch_name}.bias", (*flax_path, "bias")))
    return rules


def _norm(torch_name: str, flax_path: tuple[str, ...]) -> list[Rule]:
    return [
        Rule(f"{torch_name}.weight", (*flax_path, "scale")),
        Rule(f"{torch_name}.bias", (*flax_path, "bias")),
    ]


def _resnet(torch_name: str, flax_path: tuple[str, ...], shortcut: bool) -> list[Rule]:
    rules = []
    for norm_name, conv_name in (("norm1", "conv1"), ("norm2", "conv2")):
        rules += _norm(f"{torch_name}.{norm_name}", (*flax_path, norm_name))
        rules += _conv(f"{torch_name}.{conv_name}", (*flax_path, conv_name))
    if shortcut:
        rules += _conv(f"{torch_name}.nin_shortcut", (*flax_path, "nin_shortcut"))
    return rules


def _attn(torch_name: str, flax_path: tuple[str, ...]) -> list[Rule]:
    rules = _norm(f"{torch_name}.norm", (*flax_path, "norm"))
    for proj in ("q", "k", "v", "proj_out"):
        rules += _conv(f"{torch_name}.{proj}", (*flax_path, proj))
    return rules


def _mid(torch_name: str, flax_path: tuple[str, ...]) -> list[Rule]:
    return (
        _resnet(f"{torch_name}.block_1", (*flax_path, "block_1"), shortcut=False)
        + _attn(f"{torch_name}.attn_1", (*flax_path, "attn_1"))
        + _resnet(f"{torch_name}.block_2", (*flax_path, "block_2"), shortcut=False)
    )


def _levels(side: str, group: str, levels, resampler: str) -> list[Rule]:
    """`encoder.down.{i}` / `decoder.up.{i}` in index order; per level all blocks, then all
    attention blocks, then the resampler (PyTorch registration order)."""
    rules = []
    for lv in sorted(levels, key=lambda lv: lv.index):
        tp, fp = f"{side}.{group}.{lv.index}", (side, f"{group}_{lv.index}")
        for j in range(lv.num_blocks):
            shortcut = j == 0 and lv.in_channels != lv.channels
            rules += _resnet(f"{tp}.block.{j}", (*fp, f"block_{j}"), shortcut)
        if lv.attention:
            for j in range(lv.num_blocks):
                rules += _attn(f"{tp}.attn.{j}", (*fp, f"attn_{j}"))
        if lv.resample:
            rules += _conv(f"{tp}.{resampler}.conv", (*fp, resampler, "conv"))
    return rules


def torch_rules(model: AutoencoderKL | None = None, *, vf_proj: bool | None = None) -> list[Rule]:
    """The conversion table of `model`; `linear_proj.weight` is included when `vf_proj` is True
    (default: when the model has use_vf)."""
    model = AutoencoderKL() if model is None else model
    if vf_proj is None:
        vf_proj = model.use_vf is not None
    cfg = (model.ch, model.ch_mult, model.num_res_blocks, model.attn_resolutions, model.resolution)
    rules = _conv("encoder.conv_in", ("encoder", "conv_in"))
    rules += _levels("encoder", "down", encoder_levels(*cfg), "downsample")
    rules += _mid("encoder.mid", ("encoder", "mid"))
    rules += _norm("encoder.norm_out", ("encoder", "norm_out"))
    rules += _conv("encoder.conv_out", ("encoder", "conv_out"))
    rules += _conv("decoder.conv_in", ("decoder", "conv_in"))
    rules += _mid("decoder.mid", ("decoder", "mid"))
    rules += _levels("decoder", "up", decoder_levels(*cfg), "upsample")
    rules += _norm("decoder.norm_out", ("decoder", "norm_out"))
    rules += _conv("decoder.conv_out", ("decoder", "conv_out"))
    rules += _conv("quant_conv", ("quant_conv",))
    rules += _conv("post_quant_conv", ("post_quant_conv",))
    if vf_proj:
        rules += _conv("linear_proj", ("linear_proj",), bias=False)
    return rules


# ----------------------------------------------------------------------------------------------
# Abstract parameters


def abstract_params(model: AutoencoderKL | None = None) -> dict:
    """The model's parameter tree as `jax.ShapeDtypeStruct`s (nothing is allocated), unboxed."""
    model = AutoencoderKL() if model is None else model
    # The smallest input that passes every level; parameter shapes do not depend on its size.
    f = model.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, model.in_channels), jnp.float32)
    return abstract_variables(model, x, sample_posterior=False)


# ----------------------------------------------------------------------------------------------
# Public API


def params_from_torch(
    source: str | os.PathLike | Mapping[str, Any],
    model: AutoencoderKL | None = None,
    *,
    keep_vf_proj: bool | None = None,
) -> dict:
    """Load an upstream VA-VAE checkpoint as the `params` collection of `model`.

    Args:
      source: a `.pt`/`.ckpt`/`.safetensors`/`.npz` path or a mapping of key -> array/tensor;
        optionally wrapped as ``{'state_dict': ...}`` (Lightning checkpoints).
      model: the target `AutoencoderKL` (default: upstream's f16d32).
      keep_vf_proj: convert `linear_proj.weight` (then it must be present) into
        ``params['linear_proj']['kernel']``. Default: exactly when `model.use_vf` is set;
        False drops it even then; True also works for a model without use_vf.

    Returns:
      nested dict of numpy arrays in `model.param_dtype`; use as ``model.apply({'params': p}, x)``.

    Raises:
      ConversionError: listing every missing, unexpected or mis-shaped key.
    """
    model = AutoencoderKL() if model is None else model
    keep = (model.use_vf is not None) if keep_vf_proj is None else keep_vf_proj
    if keep and model.use_vf is None:
        model = model.clone(use_vf=model.vf_feature_dim)
    elif not keep and model.use_vf is not None:
        model = model.clone(use_vf=None)

    name = source_name(source)
    state_dict = load_state_dict(source, select=("state_dict",))
    rules = torch_rules(model)
    shapes = traverse_util.flatten_dict(abstract_params(model))
    covered = {r.flax_path for r in rules}
    if covered != set(shapes):  # the table and the modules disagree: a bug here, not in the input
        raise AssertionError(f"rule table vs Flax tree: {sorted(covered ^ set(shapes))[:10]}")

    def ignore(key: str) -> bool:
        return key.startswith(TRAINING_EXTRA_PREFIXES) or (
            not keep and key.startswith("linear_proj.")
        )

    params = to_flax(state_dict, rules, shapes, what=WHAT, source=name, ignore=ignore)
    return jax.tree.map(lambda a: np.asarray(a, dtype=model.param_dtype), params)


def params_to_torch(params: Mapping, model: AutoencoderKL | None = None) -> dict[str, np.ndarray]:
    """Flax parameters (optionally boxed, optionally under a 'params' key) -> upstream state dict
    of numpy arrays in PyTorch layout and registration order. `linear_proj.weight` is written
    when the tree has `linear_proj`."""
    model = AutoencoderKL() if model is None else model
    params = nn.meta.unbox(params)
    if set(params) == {"params"}:
        params = params["params"]
    rules = torch_rules(model, vf_proj="linear_proj" in params)
    return to_torch(params, rules, what=WHAT)


__all__ = [
    "ConversionError",
    "TRAINING_EXTRA_PREFIXES",
    "abstract_params",
    "params_from_torch",
    "params_to_torch",
    "torch_rules",
]
