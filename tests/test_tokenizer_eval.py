"""Tokenizer metrics (eval_jax.reconstruction, launch.evaluate_tokenizer)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_module
from scipy import signal

from eval_jax import reconstruction
from launch.data.procedural import write_shapes_dataset
from launch.tokenizer_eval import resize_center_crop


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """torchmetrics' recipe written out: clamp to [-1, 1], reflect-pad by 5, correlate with the
    full 11x11 Gaussian, crop the padded border, SSIM map mean per image."""
    x, y = np.clip(x, -1, 1).astype(np.float64), np.clip(y, -1, 1).astype(np.float64)
    g = np.exp(-0.5 * ((np.arange(11) - 5) / 1.5) ** 2)
    g /= g.sum()
    kernel = np.outer(g, g)
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2

    def filt(a):  # (H, W) -> same size, then cropped
        padded = np.pad(a, 5, mode="reflect")
        return signal.correlate(padded, kernel, mode="same")[5:-5, 5:-5][5:-5, 5:-5]

    out = []
    for a, b in zip(x, y, strict=True):
        maps = []
        for c in range(a.shape[-1]):
            p, t = a[..., c], b[..., c]
            mp, mt = filt(p), filt(t)
            vp = np.maximum(filt(p * p) - mp ** 2, 0)
            vt = np.maximum(filt(t * t) - mt ** 2, 0)
            cov = filt(p * t) - mp * mt
            maps.append(((2 * mp * mt + c1) * (2 * cov + c2))
                        / ((mp ** 2 + mt ** 2 + c1) * (vp + vt + c2)))
        out.append(np.mean(maps))
    return np.array(out)


def test_ssim_matches_the_torchmetrics_recipe():
    rng = np.random.default_rng(0)
    y = rng.uniform(-1, 1, (3, 24, 20, 3)).astype(np.float32)
    x = (y + rng.normal(scale=0.3, size=y.shape)).astype(np.float32)  # also outside [-1, 1]
    got = np.asarray(reconstruction.ssim(jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(got, _ssim_reference(x, y), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reconstruction.ssim(jnp.asarray(y), jnp.asarray(y)), 1.0,
                               rtol=1e-6)


def test_psnr_hand_case():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 255  # MSE = 255^2 / 48 -> PSNR = 10 log10(48)
    psnr = reconstruction.psnr_uint8(b, a)
    assert psnr[0] == pytest.approx(10 * np.log10(48)) and psnr[1] == np.inf


def test_resize_center_crop_like_torchvision():
    image = np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)
    assert resize_center_crop(image, 32).shape == (32, 32, 3)
    # no resize when the shorter side already fits: a pure center crop
    np.testing.assert_array_equal(resize_center_crop(image, 40), image[:, 10:50])


def test_evaluate_tokenizer_cli(tmp_path):
    write_shapes_dataset(tmp_path / "val", image_size=32, images_per_class=2, seed=5)
    out = run_module("launch.evaluate_tokenizer", "--config", "configs/vavae.py:tiny",
                     f"--config.data.path={tmp_path / 'val'}", "--workdir", str(tmp_path / "e"),
                     "--batch_size", "8")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["num_images"] == 20 and result["num_skipped"] == 0
    assert {"psnr", "ssim", "lpips"} <= set(result) and "rfid" not in result
    assert np.isfinite(result["psnr"]) and -1 <= result["ssim"] <= 1
    assert json.loads((tmp_path / "e" / "tokenizer_metrics.json").read_text()) == result
    assert (tmp_path / "e" / "reconstructions.png").exists()
