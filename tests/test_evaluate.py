"""launch.evaluation / launch.evaluate: ADM-format batches and the metrics they allow."""

import json
import subprocess
import sys
import zlib

import numpy as np
import pytest
from helpers import REPO

from eval_jax import metrics
from launch import evaluation


def _images(seed: int, n: int = 24, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _extract(images: np.ndarray) -> dict[str, np.ndarray]:
    """A stand-in feature network: pixel statistics as features, softmax logits over 4."""
    x = images.astype(np.float32) / 255.0
    pool = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2)), x[:, 0, 0]], axis=1)
    return {"pool": pool, "logits": pool[:, :4] * 5, "spatial": x[:, :2, :2].reshape(len(x), -1)}


def test_identical_batches_score_zero_and_report_every_metric(tmp_path):
    images = _images(0)
    np.savez(tmp_path / "a.npz", arr_0=images)
    batch = evaluation.load_batch(tmp_path / "a.npz")
    result = evaluation.evaluate(batch, batch, _extract)
    assert set(result) == {"fid", "sfid", "is", "precision", "recall"}
    assert abs(result["fid"]) < 1e-6 and abs(result["sfid"]) < 1e-6
    assert result["precision"] == result["recall"] == 1.0


def test_stored_statistics_take_precedence_over_images(tmp_path):
    samples, reference = _images(0), _images(1)
    ref_feats = _extract(reference)
    mu, sigma = metrics.feature_statistics(ref_feats["pool"] + 1.0)  # deliberately shifted
    np.savez(tmp_path / "ref.npz", arr_0=reference, mu=mu, sigma=sigma)
    np.savez(tmp_path / "s.npz", arr_0=samples)
    result = evaluation.evaluate(evaluation.load_batch(tmp_path / "s.npz"),
                                 evaluation.load_batch(tmp_path / "ref.npz"), _extract)
    want = metrics.frechet_distance(*metrics.feature_statistics(_extract(samples)["pool"]), mu,
                                    sigma)
    assert result["fid"] == pytest.approx(want, rel=1e-9)
    # no stored spatial statistics: sFID comes from the reference images, as do precision and
    # recall
    want_sfid = metrics.frechet_distance(
        *metrics.feature_statistics(_extract(samples)["spatial"]),
        *metrics.feature_statistics(ref_feats["spatial"]))
    assert result["sfid"] == pytest.approx(want_sfid, rel=1e-9)
    p, r = metrics.precision_recall(ref_feats["pool"], _extract(samples)["pool"])
    assert (result["precision"], result["recall"]) == (p, r)


def test_saved_statistics_are_whole_or_absent(tmp_path, monkeypatch):
    """A reference batch is written whole (read back as a batch, `.npz` added as np.savez
    does) or, when writing fails, not at all, and an earlier file of that name is kept."""
    features = _extract(_images(0))
    evaluation.save_statistics(tmp_path / "ref", features)
    batch = evaluation.load_batch(tmp_path / "ref.npz")
    np.testing.assert_array_equal(batch.stats[0], metrics.feature_statistics(features["pool"])[0])
    before = (tmp_path / "ref.npz").read_bytes()

    def full_disk(path, **_):
        with open(path, "wb") as f:
            f.write(b"PK half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    for name in ("ref.npz", "other.npz"):
        with pytest.raises(OSError, match="No space left"):
            evaluation.save_statistics(tmp_path / name, _extract(_images(1)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]
    assert (tmp_path / "ref.npz").read_bytes() == before


def test_precision_recall_distances_and_too_few_images(tmp_path):
    samples, reference = _images(2, n=40), _images(3, n=40)
    want = metrics.precision_recall(_extract(reference)["pool"], _extract(samples)["pool"],
                                    distances="float32")
    result = evaluation.evaluate(evaluation.Batch("s", images=samples),
                                 evaluation.Batch("r", images=reference), _extract,
                                 pr_distances="float32")
    assert (result["precision"], result["recall"]) == want
    with pytest.raises(evaluation.BatchFileError,
                       match="k = 3 neighbours need more than 3 images on each side; s: 3, r: 40"):
        evaluation.evaluate(evaluation.Batch("s", images=samples[:3]),
                            evaluation.Batch("r", images=reference), _extract)


def test_images_are_memory_mapped_where_the_file_allows(tmp_path):
    images = _images(5, n=6)
    np.savez(tmp_path / "stored.npz", arr_0=images)
    # other members first, so that arr_0 starts deeper in the file
    np.savez(tmp_path / "later.npz", mu=np.zeros(3), sigma=np.eye(3), arr_0=images)
    for name in ("stored.npz", "later.npz"):
        batch = evaluation.load_batch(tmp_path / name)
        assert isinstance(batch.images, np.memmap), name
        np.testing.assert_array_equal(batch.images, images)
    assert evaluation.load_batch(tmp_path / "later.npz").stats[0].shape == (3,)
    # a compressed member or a Fortran-order array is read into memory instead
    np.savez_compressed(tmp_path / "deflated.npz", arr_0=images)
    np.savez(tmp_path / "fortran.npz", arr_0=np.asfortranarray(images))
    for name in ("deflated.npz", "fortran.npz"):
        assert evaluation.memory_mapped(str(tmp_path / name), "arr_0") is None
        batch = evaluation.load_batch(tmp_path / name)
        assert not isinstance(batch.images, np.memmap)
        np.testing.assert_array_equal(batch.images, images)


@pytest.mark.parametrize("arrays, message", [
    ({"arr_0": np.zeros((2, 8, 8), np.uint8)}, "uint8 images"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.float32)}, "uint8 images"),
    ({"mu": np.zeros(3)}, "without its pair"),
    ({"labels": np.zeros(3)}, "neither images"),
    ({"arr_0": np.zeros((0, 8, 8, 3), np.uint8)}, "holds 0 images"),
    ({"mu": np.zeros((1, 6)), "sigma": np.eye(6)}, r"mu must be \(D,\) and sigma \(D, D\)"),
    ({"mu": np.zeros(6), "sigma": np.eye(4)}, r"got \(6,\) and \(4, 4\)"),
])
def test_bad_batch_files_are_named(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(evaluation.BatchFileError, match=message):
        evaluation.load_batch(tmp_path / "bad.npz")


def _evaluate_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.evaluate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_fid_from_statistics_alone(tmp_path):
    """Two statistics-only files (as ADM's reference batches carry) need no network."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 6)), rng.normal(loc=0.5, size=(50, 6))
    for name, x in (("a", a), ("b", b)):
        mu, sigma = metrics.feature_statistics(x)
        np.savez(tmp_path / f"{name}.npz", mu=mu, sigma=sigma)
    proc = _evaluate_cli("--samples", str(tmp_path / "a.npz"), "--reference",
                         str(tmp_path / "b.npz"), "--output", str(tmp_path / "m.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    want = metrics.frechet_distance(*metrics.feature_statistics(a), *metrics.feature_statistics(b))
    assert set(result) == {"fid"} and result["fid"] == pytest.approx(want, rel=1e-12)
    assert json.loads((tmp_path / "m.json").read_text()) == result


def test_cli_user_mistakes_are_one_line(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=_images(0))
    for args, expected in (
        (["--samples", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "none.npz")],
         "does not exist"),
        (["--samples", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "s.npz")],
         "--inception"),
        (["--samples", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "s.npz"),
          "--pr_distances", "float64"], "float16"),
    ):
        proc = _evaluate_cli(*args)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and expected in last


def test_cli_with_a_random_inception_file(tmp_path):
    """Samples and reference as images, features from pytorch-fid's layout (random weights):
    every metric, and --save_stats writes a reference batch (pool and spatial statistics)."""
    import jax
    import torch

    from eval_jax.inception import InceptionV3
    from eval_jax.inception_convert import params_to_torch

    model = InceptionV3()
    variables = model.init(jax.random.key(0), np.zeros((1, 75, 75, 3), np.float32))
    # random BatchNorm statistics too (small means, so the ReLUs stay alive)
    def randomise(path, x):
        name = jax.tree_util.keystr(path).encode()
        key = jax.random.fold_in(jax.random.key(1), zlib.crc32(name))
        if path[-1].key == "mean":
            return jax.random.uniform(key, x.shape, minval=-0.1, maxval=0.1)
        return jax.random.uniform(key, x.shape, minval=0.5, maxval=1.5)

    variables = {**variables, "batch_stats": jax.tree_util.tree_map_with_path(
        randomise, variables["batch_stats"])}
    weights = tmp_path / "inception.pth"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in params_to_torch(variables).items()},
               weights)
    np.savez(tmp_path / "s.npz", arr_0=_images(0, n=6, size=32))
    np.savez(tmp_path / "r.npz", arr_0=_images(1, n=6, size=32))
    common = ["--inception", str(weights), "--batch_size", "6", "--pr_distances", "float32"]
    proc = _evaluate_cli("--samples", str(tmp_path / "s.npz"), "--reference",
                         str(tmp_path / "r.npz"), "--save_stats", str(tmp_path / "stats.npz"),
                         *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"fid", "sfid", "is", "precision", "recall"}
    assert all(np.isfinite(v) for v in result.values()) and result["fid"] > 0
    with np.load(tmp_path / "stats.npz") as stats:
        assert stats["mu"].shape == (2048,) and stats["mu_s"].shape == (2023,)
