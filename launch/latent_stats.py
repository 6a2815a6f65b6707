"""Channel-wise latent statistics (upstream `latents_stats.pt`) and (de)normalisation.

Upstream trains LightningDiT on ``(z - mean_c) / std_c * multiplier`` and decodes samples with
``x * std_c / multiplier + mean_c``. The released statistics file is on the Hugging Face hub:
``hustvl/vavae-imagenet256-f16d32-dinov2/latents_stats.pt`` (a dict with 'mean' and 'std' of
shape (1, 32, 1, 1)); an `.npz` with the same two arrays also works.

The file's converter follows torchport's protocol, with the number of channels C as the
"model" (default: read from the file):
    upstream {'mean', 'std'} float32 (1, C, 1, 1)  <->  {'mean', 'std'} float32 (C,)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from torchport import Rule, load_state_dict, source_name, to_flax, to_torch

UPSTREAM_CHANNELS = 32  # VA-VAE f16d32
KEYS = ("mean", "std")


def torch_rules(model: int | None = None) -> list[Rule]:
    """(1, C, 1, 1) <-> (C,) for 'mean' and 'std' (the same for every C)."""
    del model
    return [Rule(k, (k,), lambda a: a.reshape(-1), lambda a: a.reshape(1, -1, 1, 1))
            for k in KEYS]


def abstract_params(model: int | None = None) -> dict:
    c = UPSTREAM_CHANNELS if model is None else model
    return {k: jax.ShapeDtypeStruct((c,), np.float32) for k in KEYS}


def params_from_torch(source: str | os.PathLike | Mapping[str, Any],
                      model: int | None = None) -> dict:
    """Upstream `latents_stats.pt` (a file or a mapping) -> {'mean', 'std'} (C,) float32; `model`
    is C, checked when given."""
    stats = load_state_dict(source)
    if model is None:
        model = int(np.size(stats["mean"])) if "mean" in stats else UPSTREAM_CHANNELS
    tree = to_flax(stats, torch_rules(), abstract_params(model),
                   what=f"latent statistics of {model} channels", source=source_name(source))
    return {k: np.asarray(v, np.float32) for k, v in tree.items()}


def params_to_torch(stats: Mapping, model: int | None = None) -> dict[str, np.ndarray]:
    """{'mean', 'std'} (C,) -> upstream {'mean', 'std'} (1, C, 1, 1) float32."""
    if model is not None and any(np.size(stats[k]) != model for k in KEYS):
        raise ValueError(f"latent statistics of {np.size(stats['mean'])} channels, "
                         f"expected {model}")
    out = to_torch(stats, torch_rules(), what="latent statistics")
    if any(isinstance(v, jax.ShapeDtypeStruct) for v in out.values()):
        return out
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def load_latent_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Return (mean, std), each (C,) float32, from `latents_stats.pt` or an `.npz`."""
    stats = load_state_dict(path)
    missing = {"mean", "std"} - set(stats)
    if missing:
        raise ValueError(f"{path}: latent statistics need 'mean' and 'std', missing "
                         f"{sorted(missing)} (found {sorted(stats)})")
    mean, std = (np.asarray(stats[k], np.float32).reshape(-1) for k in ("mean", "std"))
    if mean.shape != std.shape:
        raise ValueError(f"{path}: mean {mean.shape} and std {std.shape} differ in size")
    return mean, std


def normalize(z, mean, std, multiplier: float = 1.0):
    """NHWC latents -> the DiT's training space."""
    return (z - mean) / std * multiplier


def denormalize(x, mean, std, multiplier: float = 1.0):
    """The DiT's sample space -> NHWC VA-VAE latents."""
    return x * std / multiplier + mean
