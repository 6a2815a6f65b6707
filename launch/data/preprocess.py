"""Decoding and upstream's image preprocessing, as pure numpy / PIL functions.

- `decode_rgb`: encoded bytes -> uint8 RGB, as torchvision's `pil_loader` (`.convert("RGB")`):
  CMYK and grayscale JPEGs, PNGs named `.JPEG`, palette and alpha images all become RGB.
- `center_crop_arr`: ADM's center crop, used by upstream's latent extraction (SPEC 4.4).
- `resize_random_crop`: albumentations `SmallestMaxSize` (OpenCV bilinear) + `RandomCrop`, the
  VA-VAE training transform (SPEC 6.6).
- `to_model_range`: uint8 -> float32 [-1, 1] as upstream scales (torchvision's ToTensor +
  Normalize(0.5, 0.5) for extraction, taming's x / 127.5 - 1 for VA-VAE training). Pipelines
  hand uint8 to the device (4x less host->device traffic) and the jitted step applies this.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

PREPROCESS_MODES = ("center_crop", "random_crop")


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image -> uint8 (H, W, 3). Raises for truncated, empty or non-image data."""
    if not data:
        raise ValueError("empty file")
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decode now: a truncated file raises here, not later
        return np.asarray(image.convert("RGB"))


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM `center_crop_arr`: BOX-halve while the short side >= 2 * size, BICUBIC-resize the
    short side to `image_size`, crop the center. Returns uint8 (size, size, 3)."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def resize_random_crop(image: np.ndarray, image_size: int, rng: np.random.Generator
                       ) -> np.ndarray:
    """albumentations SmallestMaxSize(size) (cv2 INTER_LINEAR) then RandomCrop(size, size)."""
    import cv2

    h, w = image.shape[:2]
    scale = image_size / min(h, w)
    if scale != 1.0:
        new_h, new_w = round(h * scale), round(w * scale)  # as albumentations rounds both
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    h, w = image.shape[:2]
    top = int(rng.integers(0, h - image_size + 1))
    left = int(rng.integers(0, w - image_size + 1))
    return image[top : top + image_size, left : left + image_size]


def preprocess(data: bytes, mode: str, image_size: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, bool]:
    """Decode and crop one image. Returns (uint8 (size, size, 3), upscaled) where `upscaled`
    says the image's short side was below `image_size` (upstream upscales it; so do we)."""
    rgb = decode_rgb(data)
    upscaled = min(rgb.shape[:2]) < image_size
    if mode == "center_crop":
        return center_crop_arr(Image.fromarray(rgb), image_size), upscaled
    if mode == "random_crop":
        return resize_random_crop(rgb, image_size, rng), upscaled
    raise ValueError(f"unknown preprocess mode {mode!r}: {PREPROCESS_MODES}")


# uint8 -> [-1, 1] lookup tables, each bit-identical to its upstream formula
_RANGE_TABLES = {
    # torchvision ToTensor (x / 255 in float32) then Normalize(0.5, 0.5): latent extraction
    "torchvision": (np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.5))
    / np.float32(0.5),
    # taming ImagePaths: (x / 127.5 - 1.0) in float64, cast to float32: VA-VAE training
    "taming": (np.arange(256) / 127.5 - 1.0).astype(np.float32),
}


def to_model_range(images, style: str = "torchvision"):
    """uint8 images -> float32 in [-1, 1], bit-identical to upstream's `style` of scaling.

    A 256-entry table lookup, so it is exact on numpy and inside a jitted step alike."""
    if style not in _RANGE_TABLES:
        raise ValueError(f"unknown scaling style {style!r}: {sorted(_RANGE_TABLES)}")
    table = _RANGE_TABLES[style]
    if isinstance(images, np.ndarray):
        return table[images]
    import jax.numpy as jnp

    return jnp.asarray(table)[images.astype(jnp.int32)]
