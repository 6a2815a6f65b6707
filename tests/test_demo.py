"""The reduced demo end to end (`python -m launch.demo --quick`), then a rerun that reuses it."""

import json
import re

import pytest
import torch
from helpers import assert_manifest_names, run_module

# the absl prefix of an INFO line: 'I1206 18:04:35.158928 139786087832448 file.py:701] ...'
INFO_SOURCE = re.compile(r"^I\d{4} [\d:.]+ +\d+ ([\w.]+\.py):\d+\]", re.M)
ORBAX_FILES = {"checkpoint_manager.py", "async_checkpointer.py", "event_tracking.py",
               "jax_array_handlers.py", "composite_checkpoint_handler.py"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    out, log = run_module("launch.demo", "--workdir", str(workdir), "--quick", timeout=900,
                          with_stderr=True)
    return workdir, json.loads(out.strip().splitlines()[-1]), log


def test_log_has_the_demo_lines_without_the_libraries_info(demo):
    _, _, log = demo
    sources = set(INFO_SOURCE.findall(log))
    assert "metrics.py" in sources and "==> [7/7]" in log  # training progress, every stage
    assert not sources & (ORBAX_FILES | {"xla_bridge.py"}), sources


def test_summary_fields_and_pictures(demo):
    workdir, last_line, _ = demo
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
    workdir, _, _ = demo
    files = json.loads((workdir / "summary.json").read_text())["files"]
    dit = torch.load(files["lightningdit"], weights_only=True)
    assert set(dit) == {"model", "ema"}  # what upstream's inference.py / train.py read
    assert_manifest_names(dit["ema"], manifest("LightningDiT_XL_1")["state_dict"])
    vae = torch.load(files["vavae"], weights_only=True)
    assert_manifest_names(vae, manifest("VAVAE_f16d32_inference")["state_dict"])
    stats = torch.load(files["latents_stats"], weights_only=True)
    assert stats["mean"].shape == stats["std"].shape == (1, 4, 1, 1)


def test_rerun_reuses_every_stage(demo):
    workdir, first, _ = demo
    _, log = run_module("launch.demo", "--workdir", str(workdir), "--quick", "--library_logs",
                        timeout=900, with_stderr=True)
    assert ORBAX_FILES & set(INFO_SOURCE.findall(log))  # --library_logs: orbax's restores
    summary = json.loads((workdir / "summary.json").read_text())
    # the trained models, latents, samples and judge are reused: the same scores
    assert summary["sample_accuracy"] == first["sample_accuracy"]
    assert summary["fd"] == pytest.approx(first["fd"], rel=1e-6)
    assert summary["recon_psnr"] == pytest.approx(first["recon_psnr"], rel=1e-6)
