"""The reduced demo end to end (`python -m launch.demo --quick`), then a rerun that reuses it."""

import json

import pytest
import torch
from helpers import assert_manifest_names, run_module


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    out = run_module("launch.demo", "--workdir", str(workdir), "--quick", timeout=900)
    return workdir, json.loads(out.strip().splitlines()[-1])


def test_summary_fields_and_pictures(demo):
    workdir, last_line = demo
    summary = json.loads((workdir / "summary.json").read_text())
    for key in ("recon_psnr", "recon_ssim", "sample_accuracy", "fd", "fd_real_images",
                "classifier_accuracy"):
        assert isinstance(summary[key], float), key
    assert 0.0 <= summary["sample_accuracy"] <= 1.0 and summary["fd"] >= 0
    assert set(summary["seconds"]) == {"data", "vavae", "latents", "lightningdit", "sample",
                                       "evaluate", "export", "total"}
    assert last_line["sample_accuracy"] == summary["sample_accuracy"]
    for name in ("samples.png", "reconstructions.png"):
        assert (workdir / name).stat().st_size > 0
    # TensorBoard logs of both trainings
    assert list((workdir / "vavae" / "tensorboard").iterdir())
    assert list((workdir / "dit" / "tensorboard").iterdir())


def test_exported_files_have_the_upstream_layout(demo, manifest):
    workdir, _ = demo
    files = json.loads((workdir / "summary.json").read_text())["files"]
    dit = torch.load(files["lightningdit"], weights_only=True)
    assert set(dit) == {"model", "ema"}  # what upstream's inference.py / train.py read
    assert_manifest_names(dit["ema"], manifest("LightningDiT_XL_1")["state_dict"])
    vae = torch.load(files["vavae"], weights_only=True)
    assert_manifest_names(vae, manifest("VAVAE_f16d32_inference")["state_dict"])
    stats = torch.load(files["latents_stats"], weights_only=True)
    assert stats["mean"].shape == stats["std"].shape == (1, 4, 1, 1)


def test_rerun_reuses_every_stage(demo):
    workdir, first = demo
    run_module("launch.demo", "--workdir", str(workdir), "--quick", timeout=900)
    summary = json.loads((workdir / "summary.json").read_text())
    # the trained models, latents, samples and judge are reused: the same scores
    assert summary["sample_accuracy"] == first["sample_accuracy"]
    assert summary["fd"] == pytest.approx(first["fd"], rel=1e-6)
    assert summary["recon_psnr"] == pytest.approx(first["recon_psnr"], rel=1e-6)
