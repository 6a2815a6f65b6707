"""Resampling as constant matrices: DINOv2's position-table resizing and the input resize.

Every resize is an (out, in) float32 matrix computed once in numpy for a size pair and applied
as a matmul per axis, which matches `torch.nn.functional.interpolate` (bicubic with or without
antialiasing, bilinear) to float32 rounding; see `vavae_jax.dinov2` for where each is used.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST

# How the stored position table is resampled to another patch grid:
#   "antialias":      timm dynamic_img_size (upstream VA-VAE), official `_reg` hub models and
#                     transformers Dinov2WithRegisters: bicubic a=-0.5, antialias=True, by size.
#   "bicubic":        transformers Dinov2Model: bicubic a=-0.75, no antialias, by size.
#   "bicubic_offset": official non-register hub models (interpolate_offset=0.1): bicubic a=-0.75,
#                     no antialias, scale_factor (g + 0.1) / G.
POS_INTERPOLATIONS = ("antialias", "bicubic", "bicubic_offset")


# ----------------------------------------------------------------------------------------------
# Resampling matrices (numpy, computed once per size pair; float32 (out, in))
# ----------------------------------------------------------------------------------------------


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel K(x) with parameter `a` (support |x| < 2)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _frozen(w: np.ndarray) -> np.ndarray:
    w = w.astype(np.float32)
    w.flags.writeable = False  # shared by the lru caches below
    return w


@functools.lru_cache(maxsize=64)
def antialias_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch `interpolate(mode='bicubic', antialias=True)` by size.

    PIL-style separable filter: when downsampling, the kernel is stretched by the scale so that
    every input sample contributes; taps outside the input are dropped and each row is
    renormalised to sum to 1.
    """
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1.0 else 2.0
    stretch = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        taps = _keys_cubic((np.arange(lo, hi) - center + 0.5) * stretch, -0.5)
        w[i, lo:hi] = taps / taps.sum()
    return _frozen(w)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(n_in: int, n_out: int, scale: float | None = None) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch `interpolate(mode='bicubic', align_corners=False)`.

    Four taps with a = -0.75 around the half-pixel source position, indices clamped to the
    border. `scale` is the input/output step (default n_in / n_out; 1 / scale_factor when the
    caller passes a scale factor).
    """
    step = n_in / n_out if scale is None else scale
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        src = step * (i + 0.5) - 0.5
        left = min(int(np.floor(src)), n_in - 1)
        t = min(max(src - left, 0.0), 1.0)
        coeffs = _keys_cubic(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), -0.75)
        for k in range(4):
            w[i, min(max(left - 1 + k, 0), n_in - 1)] += coeffs[k]
    return _frozen(w)


@functools.lru_cache(maxsize=64)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch `interpolate(mode='bilinear', align_corners=False)`.

    No antialias (two taps, half-pixel centres, source index clamped at 0). The source position
    is rounded to float32 once (as a fused multiply-add would); with that the resize agrees with
    PyTorch's CPU kernel to ~1 ulp, where plain float32 arithmetic is off by up to ~3e-6.
    """
    step = np.float32(n_in) / np.float32(n_out)
    dst = np.arange(n_out, dtype=np.float64)
    src = np.maximum((np.float64(step) * (dst + 0.5) - 0.5).astype(np.float32), 0.0)
    left = src.astype(np.int64)
    frac = src - left.astype(np.float32)
    right = np.minimum(left + 1, n_in - 1)
    w = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(w, (rows, left), np.float32(1.0) - frac)
    np.add.at(w, (rows, right), frac)
    return _frozen(w)


def pos_resize_matrices(
    old_grid: tuple[int, int], new_grid: tuple[int, int], method: str = "antialias"
) -> tuple[np.ndarray, np.ndarray]:
    """Row and column matrices, (new_h, old_h) and (new_w, old_w), for `method`."""
    if method == "antialias":
        return (
            antialias_bicubic_matrix(old_grid[0], new_grid[0]),
            antialias_bicubic_matrix(old_grid[1], new_grid[1]),
        )
    if method == "bicubic":
        return bicubic_matrix(old_grid[0], new_grid[0]), bicubic_matrix(old_grid[1], new_grid[1])
    if method == "bicubic_offset":
        mats = []
        for old, new in zip(old_grid, new_grid):
            factor = float(new + 0.1) / old
            if int(np.floor(old * factor)) != new:  # the official code asserts the same
                raise ValueError(f"scale factor {factor} does not give {new} positions")
            mats.append(bicubic_matrix(old, new, scale=1.0 / factor))
        return mats[0], mats[1]
    raise ValueError(f"unknown pos interpolation {method!r}; expected one of {POS_INTERPOLATIONS}")


def resample_pos_embed(
    pos_embed: jax.Array, new_grid: tuple[int, int], method: str = "antialias"
) -> jax.Array:
    """Resample a (1, 1 + G*G, D) position table to (1, 1 + h*w, D); the CLS slot is kept.

    Computed in float32 like timm (`posemb.float()`); returned unchanged when the grid matches.
    """
    num_patches = pos_embed.shape[1] - 1
    old = int(round(num_patches**0.5))
    if old * old != num_patches:
        raise ValueError(f"pos_embed has {num_patches} patch positions, not a square grid")
    if tuple(new_grid) == (old, old):
        return pos_embed
    rows, cols = pos_resize_matrices((old, old), tuple(new_grid), method)
    dim = pos_embed.shape[-1]
    table = pos_embed[0, 1:].astype(jnp.float32).reshape(old, old, dim)
    # Separable: columns, then rows (the order only changes float rounding).
    table = jnp.einsum("jw,hwd->hjd", cols, table, precision=HIGHEST)
    table = jnp.einsum("ih,hjd->ijd", rows, table, precision=HIGHEST)
    patches = table.reshape(1, new_grid[0] * new_grid[1], dim).astype(pos_embed.dtype)
    return jnp.concatenate([pos_embed[:, :1], patches], axis=1)
