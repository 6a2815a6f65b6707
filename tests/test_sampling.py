"""Sampling at scale (launch.sampling / launch.sample): labels, chunking, resumption."""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, run_module, run_processes

from launch import sampling


def test_class_labels_random_and_balanced():
    random = sampling.class_labels(1000, 10, seed=0, balanced=False)
    assert random.dtype == np.int32 and random.min() >= 0 and random.max() < 10
    np.testing.assert_array_equal(random, sampling.class_labels(1000, 10, 0, False))
    assert not np.array_equal(random, sampling.class_labels(1000, 10, 1, False))
    balanced = sampling.class_labels(1003, 10, seed=0, balanced=True)
    counts = np.bincount(balanced, minlength=10)
    assert counts.tolist() == [101, 101, 101] + [100] * 7
    assert not np.array_equal(balanced[:10], np.arange(10))  # shuffled


def test_plan_rounds_chunks_to_batches_and_checks_devices():
    plan = sampling.make_plan(50_000, 256, 1000, num_devices=8)
    assert plan.chunk_size == 1024 and plan.num_chunks == 49
    assert plan.chunk_range(48) == (49_152, 50_000)
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        sampling.make_plan(10, 4, 8, num_devices=8)
    with pytest.raises(ValueError, match="batch_size 0 and --chunk_size 8 must be positive"):
        sampling.make_plan(10, 0, 8, num_devices=1)


def test_sampling_mistakes_are_user_errors_that_leave_no_layout(tmp_path):
    """Settings that cannot work are named before anything runs, and a run whose weights do
    not load records no layout (the corrected rerun in the same workdir is not refused)."""
    from configs.lightningdit import get_config
    from launch import build
    from launch.cli import UserError
    from launch.data.latents import save_latent_stats
    from torchport import CheckpointFileError

    def config(**model):
        c = get_config("tiny")
        c.model.update(model)
        c.tokenizer.variant = ""
        return c

    run = lambda c, **kw: sampling.run_sampling(c, str(tmp_path / "s"),  # noqa: E731
                                                checkpoint=None, num_samples=2, **kw)
    with pytest.raises(UserError, match="sampling writes through the local file system"):
        sampling.run_sampling(config(), "gs://bucket/fid50k", checkpoint=None, num_samples=2)
    with pytest.raises(UserError, match="--labels a,1: class indices are integers"):
        run(config(), labels=["a", "1"])
    bad = config()
    bad.sample.method = "eulr"
    with pytest.raises(UserError, match="config.sample.method='eulr'"):
        build.sampler_options(bad)
    with pytest.raises(UserError, match="config.model.dtype 'float33'"):
        build.dit_model(config(dtype="float33"))
    stats = config(in_channels=8)
    save_latent_stats(str(tmp_path / "stats.pt"), np.zeros(4), np.ones(4))
    stats.latent_stats = str(tmp_path / "stats.pt")
    with pytest.raises(UserError, match=r"latent statistics .* have shape \(4,\); the model "
                                        r"takes 8 channels"):
        run(stats)
    tokenizer = config()
    tokenizer.tokenizer.variant = "tiny"  # 4-channel latents
    with pytest.raises(UserError, match="decodes 4-channel latents; the model makes 8"):
        sampling.build_decoder(tokenizer, mesh=None, latent_channels=8)
    weights_only = config()
    weights_only.tokenizer.checkpoint = "vavae-imagenet256-f16d32-dinov2.pt"
    with pytest.raises(UserError, match="needs config.tokenizer.variant"):  # not latents
        sampling.build_decoder(weights_only, mesh=None)
    tokenizer.tokenizer.variant = "nope"
    with pytest.raises(UserError, match="config.tokenizer.variant: unknown config variant"):
        sampling.build_decoder(tokenizer, mesh=None)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointFileError, match="not a torch checkpoint"):  # a user error
        sampling.run_sampling(config(), str(tmp_path / "s"), checkpoint=str(tmp_path / "junk.pt"),
                              num_samples=2)
    assert not (tmp_path / "s" / sampling.LAYOUT_FILE).exists()


def test_a_rerun_with_another_model_dtype_is_refused(tmp_path):
    """The compute dtype changes the images: chunks of both must not mix."""
    from configs.lightningdit import get_config
    from launch.cli import UserError

    config = get_config("tiny")
    config.sample.update(num_steps=2, batch_size=8)
    sampling.run_sampling(config, str(tmp_path), checkpoint=None, num_samples=8, grid=0)
    config.model.dtype = "bfloat16"
    with pytest.raises(UserError, match=r"model: \['tiny'\] there vs \['tiny \(bfloat16\)'\]"):
        sampling.run_sampling(config, str(tmp_path), checkpoint=None, num_samples=8, grid=0)


def test_sde_samples_do_not_depend_on_the_batch_size(tmp_path):
    """Each sample's SDE noise is keyed by its index; a workdir begun with the earlier
    per-batch noise (no `sde_noise` in its layout) is refused, naming the setting."""
    from configs.lightningdit import get_config
    from launch.cli import UserError

    config = get_config("tiny")
    config.tokenizer.variant = ""  # latents: compared as floats
    config.sample.update(method="euler_maruyama", num_steps=3)
    for batch in (16, 8):  # over the 8 test devices
        config.sample.batch_size = batch
        sampling.run_sampling(config, str(tmp_path / f"b{batch}"), checkpoint=None,
                              num_samples=16, grid=0)
    with np.load(tmp_path / "b16" / "samples.npz") as a, \
            np.load(tmp_path / "b8" / "samples.npz") as b:
        assert a["arr_0"].shape == (16, 8, 8, 4)
        np.testing.assert_allclose(a["arr_0"], b["arr_0"], rtol=1e-5, atol=1e-5)
        assert np.abs(a["arr_0"][0] - a["arr_0"][1]).max() > 0.1

    layout_file = tmp_path / "b8" / sampling.LAYOUT_FILE
    layout = json.loads(layout_file.read_text())
    assert layout.pop("sde_noise") == "per_sample"
    layout_file.write_text(json.dumps(layout))
    with pytest.raises(UserError, match=r"other settings \(sde_noise: \[None\] there vs "
                                        r"\['per_sample'\] now\)"):
        sampling.run_sampling(config, str(tmp_path / "b8"), checkpoint=None, num_samples=16,
                              grid=0)


TINY = ["launch.sample", "--config", "configs/lightningdit.py:tiny", "--num_samples", "20",
        "--config.sample.batch_size=4", "--config.sample.num_steps=4"]


def _summary(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    """20 samples in one uninterrupted run (chunks of 12, 2 devices)."""
    workdir = tmp_path_factory.mktemp("one_run")
    run_module(*TINY, "--workdir", str(workdir), "--chunk_size", "12", "--grid", "0")
    return workdir


def test_killed_run_resumes_to_the_images_of_one_run(one_run, tmp_path):
    """A run stopped after one chunk (plus a half-written file) finishes on rerun with exactly
    N images, identical to one uninterrupted run with another chunking."""
    first = tmp_path / "resumed"
    out = _summary(run_module(*TINY, "--workdir", str(first), "--chunk_size", "8",
                              "--max_chunks", "1"))
    assert out["images_made"] == 8 and out["chunks_missing"] == 2
    assert not (first / "samples.npz").exists()
    (first / "chunks" / "chunk_00001.npz.tmp.npz").write_bytes(b"half a file")
    out = _summary(run_module(*TINY, "--workdir", str(first), "--chunk_size", "8"))
    assert out["images_made"] == 12 and out["shape"] == [20, 32, 32, 3]

    other = one_run
    with np.load(first / "samples.npz") as a, np.load(other / "samples.npz") as b:
        assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (20, 32, 32, 3)
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert (first / "samples.png").exists() and not (other / "samples.png").exists()

    # the same workdir with other settings is refused, naming what differs
    proc = subprocess.run([sys.executable, "-m", *TINY, "--workdir", str(first), "--chunk_size",
                           "8", "--config.sample.cfg_scale=2.0"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert "sample" in proc.stderr.strip().splitlines()[-1]


def test_two_processes_sample_like_one(one_run, tmp_path):
    """Two JAX processes (2 devices each) share every batch and write one batch file with the
    images of a one-process run (up to rounding of the differently sharded computation)."""
    run_processes(["-m", *TINY, "--workdir", str(tmp_path), "--chunk_size", "8"])
    with np.load(tmp_path / "samples.npz") as a, np.load(one_run / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
        assert a["arr_0"].shape == (20, 32, 32, 3) and diff.max() <= 1 and diff.mean() < 0.01


def test_hosts_without_a_shared_workdir_resume(one_run, tmp_path):
    """Process 0 writes the chunks; a rerun follows its view of which exist, also when the
    other processes' workdir (another host's disk) holds none (they used to hang)."""
    workdir = lambda i: ["--workdir", str(tmp_path / f"host{i}")]  # noqa: E731
    run_processes(["-m", *TINY, "--chunk_size", "8", "--max_chunks", "1"], process_args=workdir)
    run_processes(["-m", *TINY, "--chunk_size", "8"], process_args=workdir)
    assert not list((tmp_path / "host1" / "chunks").iterdir())
    with np.load(tmp_path / "host0" / "samples.npz") as a, np.load(one_run / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
        assert a["arr_0"].shape == (20, 32, 32, 3) and diff.max() <= 1 and diff.mean() < 0.01
