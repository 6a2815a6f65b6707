"""Channel-wise latent statistics (upstream `latents_stats.pt`) and (de)normalisation.

Upstream trains LightningDiT on ``(z - mean_c) / std_c * multiplier`` and decodes samples with
``x * std_c / multiplier + mean_c``. The released statistics file is on the Hugging Face hub:
``hustvl/vavae-imagenet256-f16d32-dinov2/latents_stats.pt`` (a dict with 'mean' and 'std' of
shape (1, 32, 1, 1)); an `.npz` with the same two arrays also works.
"""

from __future__ import annotations

import os

import numpy as np

from torchport import load_state_dict


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
