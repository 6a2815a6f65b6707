"""Reconstruction metrics of a tokenizer, as upstream's evaluate_tokenizer.py computes them.

- `psnr_uint8`: per image on the saved 8-bit images, 20 log10(255 / sqrt(MSE)).
- `ssim`: torchmetrics' StructuralSimilarityIndexMeasure with data_range=(-1, 1): both inputs
  clamped to [-1, 1], an 11x11 Gaussian window (sigma 1.5), k1 = 0.01, k2 = 0.03, the map kept
  where the window lies inside the image (torchmetrics pads by reflection, then crops that
  border), averaged over channels and pixels per image.

Pure JAX on NHWC arrays; LPIPS is `vavae_jax.lpips.LPIPS`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def psnr_uint8(images: np.ndarray, references: np.ndarray) -> np.ndarray:
    """(N,) PSNR in dB of uint8 images (N, H, W, C) against references; inf where equal."""
    if images.shape != references.shape:
        raise ValueError(f"shapes differ: {images.shape} vs {references.shape}")
    diff = images.astype(np.float64) - references.astype(np.float64)
    mse = np.mean(diff ** 2, axis=tuple(range(1, diff.ndim)))
    with np.errstate(divide="ignore"):
        return 20 * np.log10(255.0 / np.sqrt(mse))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> jax.Array:
    """(size,) normalised 1-D Gaussian centred on the middle tap."""
    x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    g = jnp.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _filter_valid(x: jax.Array, window: jax.Array) -> jax.Array:
    """Separable Gaussian filter of (N, H, W, C) over H and W, 'valid' region only."""
    k = len(window)
    x = sum(window[i] * x[:, i:x.shape[1] - k + 1 + i] for i in range(k))
    return sum(window[i] * x[:, :, i:x.shape[2] - k + 1 + i] for i in range(k))


def ssim(images: jax.Array, references: jax.Array, *, data_range: tuple[float, float] = (-1.0, 1.0),
         window_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
         ) -> jax.Array:
    """(N,) SSIM of images (N, H, W, C) against references, in `data_range` (torchmetrics)."""
    lo, hi = data_range
    x = jnp.clip(images.astype(jnp.float32), lo, hi)
    y = jnp.clip(references.astype(jnp.float32), lo, hi)
    c1, c2 = (k1 * (hi - lo)) ** 2, (k2 * (hi - lo)) ** 2
    window = gaussian_window(window_size, sigma)
    mu_x, mu_y = _filter_valid(x, window), _filter_valid(y, window)
    var_x = jnp.maximum(_filter_valid(x * x, window) - mu_x ** 2, 0.0)
    var_y = jnp.maximum(_filter_valid(y * y, window) - mu_y ** 2, 0.0)
    cov = _filter_valid(x * y, window) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return index.mean(axis=(1, 2, 3))
