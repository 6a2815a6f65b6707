"""Image grids for sample previews (PNG, written with PIL), plain or with class labels."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageDraw


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] float images -> uint8 as upstream: uint8(clip(127.5 x + 128, 0, 255))."""
    return np.clip(127.5 * np.asarray(images, np.float32) + 128.0, 0, 255).astype(np.uint8)


def latent_preview(latents: np.ndarray) -> np.ndarray:
    """First three latent channels of (N, H, W, C) as uint8 RGB, each sample min-max scaled."""
    rgb = np.asarray(latents[..., :3], np.float32)
    lo = rgb.min(axis=(1, 2, 3), keepdims=True)
    hi = rgb.max(axis=(1, 2, 3), keepdims=True)
    return ((rgb - lo) / np.maximum(hi - lo, 1e-8) * 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int | None = None, upscale: int = 1) -> np.ndarray:
    """Tile uint8 images (N, H, W, 3) into one uint8 grid, `ncols` per row (default ~sqrt N),
    each pixel repeated `upscale` times (nearest)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * h, ncols * w, 3), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    return np.repeat(np.repeat(grid, upscale, axis=0), upscale, axis=1)


def save_grid(path: str | os.PathLike, images: np.ndarray, ncols: int | None = None,
              upscale: int = 1) -> None:
    """`make_grid` written as one PNG."""
    Image.fromarray(make_grid(images, ncols, upscale)).save(path)


def labelled_grid(images: np.ndarray, labels: np.ndarray, ncols: int | None = None,
                  class_names: list[str] | None = None, rows: bool = False) -> np.ndarray:
    """uint8 grid of images (N, H, W, 3), each with its class written above it (`rows`: only
    the first image of each row, for grids with one class per row)."""
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    scale = max(1, 64 // images.shape[1])
    tiles = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
        h, w, _ = image.shape
        tile = Image.new("RGB", (w, h + 12), (255, 255, 255))
        tile.paste(Image.fromarray(image), (0, 12))
        if not rows or i % ncols == 0:
            name = class_names[label] if class_names else str(int(label))
            ImageDraw.Draw(tile).text((2, 0), name, fill=(0, 0, 0))
        tiles.append(np.asarray(tile))
    return make_grid(np.stack(tiles), ncols=ncols)
