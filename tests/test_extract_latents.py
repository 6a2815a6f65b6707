"""`python -m launch.extract_latents` end to end on the procedural shapes (tiny VA-VAE): upstream's
file layout, skipped images, statistics, resume after a kill, checkpoints, readable errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from helpers import REPO, run_module, run_processes, xla_flags
from safetensors import safe_open

from configs.lightningdit import get_config as dit_config
from configs.vavae import get_config
from launch.build import autoencoder
from launch.data.latents import LatentShardSource, make_latent_iterator
from launch.data.procedural import write_shapes_dataset
from launch.params_io import save_params

SHARDS = [f"latents_rank00_shard{s:03d}.safetensors" for s in range(4)]


def extract(tree, workdir, *extra):
    return run_module("launch.extract_latents", "--config", "configs/vavae.py:tiny",
                      f"--config.data.path={tree}", "--config.data.procedural_images_per_class=0",
                      "--config.extract.batch_size=8", "--config.extract.shard_size=16",
                      "--workdir", str(workdir), *extra)


def read(path):
    with safe_open(path, "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    base = tmp_path_factory.mktemp("extract")
    tree = write_shapes_dataset(base / "shapes", image_size=32, images_per_class=5)
    (base / "shapes" / "03_yellow_star" / "zz_broken.png").write_bytes(b"\x89PNG truncated")
    out = base / "latents"
    stdout = extract(tree, out)
    return base, tree, out, stdout


def test_layout_dtypes_and_summary_match_upstream(extracted):
    _, tree, out, stdout = extracted
    assert json.loads(stdout.strip().splitlines()[-1]) == {
        "num_images": 50, "num_skipped": 1, "num_shards": 4}
    files = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))
    assert files == SHARDS  # 51 files, 16 per shard
    tensors, meta = read(out / SHARDS[0])
    assert tensors["latents"].shape == (16, 4, 8, 8) and tensors["latents"].dtype == np.float32
    assert tensors["latents_flip"].shape == (16, 4, 8, 8)
    assert tensors["labels"].dtype == np.int64
    assert meta["total_size"] == "16"
    assert not np.allclose(tensors["latents"], tensors["latents_flip"])
    # file 20 (the last of class 3) is broken: shard 1 (files 16-31) keeps 15 rows
    second, meta = read(out / SHARDS[1])
    assert len(second["labels"]) == 15 and meta["num_skipped"] == "1"
    assert len(read(out / SHARDS[3])[0]["labels"]) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 50 and summary["num_skipped"] == 1
    assert summary["skipped"][0].endswith("zz_broken.png")
    labels = np.concatenate([read(out / f)[0]["labels"] for f in SHARDS])
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 5))


def test_stats_equal_numpy_over_all_latents(extracted):
    _, _, out, _ = extracted
    z = np.concatenate([read(out / f)[0]["latents"] for f in SHARDS]).astype(np.float64)
    stats = torch.load(out / "latents_stats.pt", weights_only=True)
    assert stats["mean"].shape == (1, 4, 1, 1)
    np.testing.assert_allclose(stats["mean"].numpy().ravel(), z.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(stats["std"].numpy().ravel(), z.std(axis=(0, 2, 3), ddof=1),
                               rtol=1e-5)


def test_latent_pipeline_reads_the_extraction(extracted):
    _, _, out, _ = extracted
    data = dit_config("tiny").data
    data.update(path=str(out), worker_count=0)
    it = make_latent_iterator(data, global_batch_size=10, seed=0, num_classes=10,
                              latent_size=8, channels=4)
    batch = next(it)
    it.close()
    assert batch["latents"].shape == (10, 8, 8, 4)
    assert abs(float(batch["latents"].mean())) < 0.5  # normalised with the stats
    assert LatentShardSource(str(out)).latent_shape == (4, 8, 8)


def test_rerun_after_a_kill_gives_the_same_latents(extracted, tmp_path):
    _, tree, out, _ = extracted
    # a run killed while writing shard 2: shards 0-1 complete, a half-written temp file
    killed = tmp_path / "killed"
    killed.mkdir()
    for name in ["extraction.json", *SHARDS[:2]]:
        shutil.copy(out / name, killed / name)
    (killed / (SHARDS[2] + ".tmp")).write_bytes(b"half a file")
    # resumed from the same weights, here given as a training run's latest params item
    config = get_config("tiny")
    model = autoencoder(config)
    params = nn.meta.unbox(model.init(jax.random.key(config.seed), jnp.zeros((1, 4, 4, 3)),
                                      sample_posterior=False)["params"])
    save_params(tmp_path / "run" / "checkpoints" / "7" / "params", params)
    os.utime(killed / SHARDS[0], (0, 0))
    stdout = extract(tree, killed, "--checkpoint", str(tmp_path / "run"))
    assert json.loads(stdout.strip().splitlines()[-1])["num_images"] == 50
    assert os.path.getmtime(killed / SHARDS[0]) == 0  # complete shards are not redone
    for name in SHARDS:
        want, got = read(out / name)[0], read(killed / name)[0]
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name} {key}")
    assert not any(p.endswith(".tmp") for p in os.listdir(killed))  # replaced by the shard


def run_failing(*args):
    env = dict(os.environ, XLA_FLAGS=xla_flags(2))
    proc = subprocess.run([sys.executable, "-m", "launch.extract_latents", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr.strip().splitlines()[-1]


def test_extraction_reads_every_image_as_upstream_image_folder(tmp_path):
    """config.data.exclude leaves a file out of VA-VAE training (upstream's data list), not out
    of extraction (upstream's extract_features.py reads the whole ImageFolder)."""
    from launch.data.extraction import extraction_source
    from launch.data.image_pipeline import prepare_source

    tree = write_shapes_dataset(tmp_path / "shapes", image_size=8, images_per_class=2)
    name = sorted(os.listdir(os.path.join(tree, "00_red_disc")))[0]
    data = get_config("tiny").data
    data.update(path=str(tree), procedural_images_per_class=0, exclude=(name,))
    assert len(prepare_source(data)) == 19
    assert len(extraction_source(data)) == 20
    assert data.exclude == (name,)  # the caller's config is unchanged


def test_user_mistakes_are_one_line_errors(extracted, tmp_path):
    _, tree, out, _ = extracted
    tiny = ["--config", "configs/vavae.py:tiny", "--config.data.procedural_images_per_class=0"]
    line = run_failing(*tiny, f"--config.data.path={tree}", "--config.extract.shard_size=32",
                       "--workdir", str(out))
    assert "different settings" in line and "shard_size" in line
    line = run_failing(*tiny, f"--config.data.path={tmp_path / 'nowhere'}", "--workdir",
                       str(tmp_path / "o1"))
    assert line.startswith("error:") and "does not exist" in line
    line = run_failing("--config", "configs/vavae.py:long_stage3", f"--config.data.path={tree}",
                       "--workdir", str(tmp_path / "o2"))
    assert "--checkpoint is required" in line
    junk = tmp_path / "junk" / "n01"
    junk.mkdir(parents=True)
    for i in range(6):
        (junk / f"{i}.JPEG").write_text("<html>404</html>")
    line = run_failing(*tiny, f"--config.data.path={junk.parent}", "--workdir",
                       str(tmp_path / "o3"), "--config.data.bad_fraction_min_items=4")
    assert "6 of 6 images could not be decoded" in line and "n01/0.JPEG" in line


def test_a_shard_whose_input_fails_stops_its_decoding_workers(extracted, tmp_path,
                                                               monkeypatch):
    """One process: the input's DataError leaves extract_latents, after the shard's grain
    iterator (and its workers) was closed, and without writing the shard."""
    from launch.data import extraction
    from launch.data.sources import DataError

    _, tree, _, _ = extracted
    opened = []

    class FailingBatches:
        closed = False

        def __next__(self):
            raise DataError("shard file unreadable")

        def close(self):
            self.closed = True

    def shard_batches(*args):
        opened.append(FailingBatches())
        return opened[-1]

    monkeypatch.setattr(extraction, "shard_batches", shard_batches)
    config = get_config("tiny")
    config.data.path, config.data.procedural_images_per_class = str(tree), 0
    config.extract.batch_size, config.extract.shard_size = 8, 16
    with pytest.raises(DataError, match="shard file unreadable"):
        extraction.extract_latents(config, str(tmp_path / "out"))
    assert len(opened) == 1 and opened[0].closed
    assert not any(name.endswith(".safetensors") for name in os.listdir(tmp_path / "out"))


def test_an_extraction_killed_before_its_summary_is_redone_by_prepare(extracted, tmp_path,
                                                                     monkeypatch):
    """The tiny LightningDiT's own latent preparation counts an extraction as finished by its
    summary (written last, renamed into place), not by its statistics: a kill between the two
    is resumed on the next run; latents made elsewhere (statistics, none of our files) are
    used as they are. The statistics file itself is never half-written."""
    from launch.data import extraction
    from launch.data.latents import save_latent_stats
    from launch.training.adapters import make_adapter

    _, _, out, _ = extracted
    assert (out / "summary.json").exists() and not list(out.glob("*.tmp"))
    calls = []
    monkeypatch.setattr(extraction, "extract_latents", lambda *args: calls.append(args))
    config = dit_config("tiny")
    config.data.prepare = "tiny"
    for name, files in (("finished", ("extraction.json", "latents_stats.pt", "summary.json")),
                        ("killed", ("extraction.json", "latents_stats.pt")),
                        ("foreign", ("latents_stats.pt",))):
        (tmp_path / name).mkdir()
        for file in files:
            shutil.copyfile(out / file, tmp_path / name / file)
        config.data.path = str(tmp_path / name)
        make_adapter(config).prepare_latents()
    assert [args[1] for args in calls] == [str(tmp_path / "killed")]
    save_latent_stats(str(tmp_path / "s.pt"), np.zeros(3), np.ones(3))
    assert os.listdir(tmp_path / "foreign") == ["latents_stats.pt"] and not list(
        tmp_path.glob("s.pt.tmp"))


def test_two_processes_write_per_rank_shards_equal_to_one_process(extracted, tmp_path):
    """First with a bad-image limit that process 0's broken file exceeds in its shard 1: both
    processes stop there with its message, keeping shard 0. The rerun continues from it."""
    _, tree, out, _ = extracted
    args = ["-m", "launch.extract_latents", "--config", "configs/vavae.py:tiny",
            f"--config.data.path={tree}", "--config.data.procedural_images_per_class=0",
            "--config.extract.batch_size=8", "--config.extract.shard_size=10",
            "--workdir", str(tmp_path)]
    results = run_processes([*args, "--config.data.bad_fraction_min_items=1"], check=False)
    assert [returncode for returncode, _, _ in results] == [1, 1]
    for _, _, err in results:
        assert "Traceback" not in err, err[-3000:]
        assert err.strip().splitlines()[-1].startswith(
            "error: bad input on process 0 in shard 1: 1 of 20 images could not be decoded, "
            "more than config.data.max_bad_fraction=0.01")
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "latents_rank00_shard000.safetensors", "latents_rank01_shard000.safetensors"]
    run_processes(args)
    one = {k: np.concatenate([read(out / f)[0][k] for f in SHARDS])
           for k in ("latents", "latents_flip", "labels")}
    kept = np.delete(np.arange(51), 20)  # file 20 is the broken one
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_images"] == 50 and summary["num_processes"] == 2
    for rank in range(2):
        files = sorted(tmp_path.glob(f"latents_rank{rank:02d}_shard*.safetensors"))
        assert len(files) == 3  # 26 / 25 images per rank, 10 per shard
        got = {k: np.concatenate([read(f)[0][k] for f in files]) for k in one}
        rows = np.searchsorted(kept, [i for i in range(rank, 51, 2) if i != 20])
        # noise is keyed by image, so each rank's rows are the one-process rows up to rounding:
        # XLA's CPU convolutions (launch.xla_cpu) block their sums by the per-device batch,
        # here 2 against 4 images (a wrong image or noise would differ by O(1))
        np.testing.assert_array_equal(got["labels"], one["labels"][rows])
        for key in ("latents", "latents_flip"):
            np.testing.assert_allclose(got[key], one[key][rows], rtol=1e-5, atol=1e-5,
                                       err_msg=f"rank {rank} {key}")
