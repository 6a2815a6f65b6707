"""Sample-quality evaluation as a library: ADM-format batches, sharded features, the metrics.

A *batch file* is an ADM evaluator `.npz`: `arr_0` uint8 images (N, H, W, 3) and/or
precomputed statistics `mu`, `sigma` (pool features) and `mu_s`, `sigma_s` (spatial features),
as in ADM's `VIRTUAL_imagenet256_labeled.npz`. `evaluate` reproduces what the ADM evaluator
reports from two such files: FID (and sFID) from the statistics (the file's own when present,
else computed from its images), the Inception Score of the samples, and precision / recall
between the reference images and the samples.

The feature network is any `FeatureExtractor`: the Inception port (`inception_extractor`) for
real runs, a small classifier for the demo. The metric math lives in `eval_jax.metrics`.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import zipfile
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from eval_jax import metrics
from launch import sharding


class BatchFileError(ValueError):
    """An evaluation input that is not a usable ADM-format batch."""


@dataclasses.dataclass
class Batch:
    """One side of an evaluation: images and/or precomputed feature statistics."""

    path: str
    images: np.ndarray | None = None  # (N, H, W, 3) uint8
    stats: tuple[np.ndarray, np.ndarray] | None = None  # pool features: mu (D,), sigma (D, D)
    spatial_stats: tuple[np.ndarray, np.ndarray] | None = None


def memory_mapped(path: str, name: str) -> np.ndarray | None:
    """`name` of the `.npz` at `path` as a read-only memory map, or None where it cannot be one
    (a compressed member, Fortran order, an object array). `np.savez` stores members
    uncompressed, so 50,000 samples at 256x256 (9.8 GB) are read from the page cache as the
    batches need them instead of into memory at once."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the member's local header: its name and extra field lengths follow
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return None
        start = info.header_offset + 30 + sum(struct.unpack("<HH", local[26:30]))
        f.seek(start)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        offset = f.tell()
    size = dtype.itemsize * int(np.prod(shape))
    if fortran or dtype.hasobject or info.file_size != offset - start + size:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def load_batch(path: str | os.PathLike) -> Batch:
    """Read an ADM-format `.npz` (see the module docstring), checking what it holds. Images
    stay on disk, memory-mapped (`memory_mapped`), where the file allows it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = np.load(path)
    except Exception as e:  # noqa: BLE001 (any unreadable file is the user's input problem)
        raise BatchFileError(f"{path}: not a readable .npz ({e})") from e
    with data:
        keys = set(data.files)
        batch = Batch(path)
        if "arr_0" in keys:
            images = memory_mapped(path, "arr_0")
            if images is None:
                images = data["arr_0"]
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise BatchFileError(f"{path}: arr_0 must be uint8 images (N, H, W, 3), got "
                                     f"{images.dtype} {images.shape}")
            if len(images) < 2:
                raise BatchFileError(f"{path}: arr_0 holds {len(images)} images; feature "
                                     f"statistics need at least 2")
            batch.images = images
        for names, field in ((("mu", "sigma"), "stats"), (("mu_s", "sigma_s"), "spatial_stats")):
            if set(names) <= keys:
                mu, sigma = data[names[0]], data[names[1]]
                if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
                    raise BatchFileError(f"{path}: {names[0]} must be (D,) and {names[1]} "
                                         f"(D, D), got {mu.shape} and {sigma.shape}")
                setattr(batch, field, (mu, sigma))
            elif set(names) & keys:
                raise BatchFileError(f"{path}: has {sorted(set(names) & keys)} without its pair "
                                     f"{sorted(set(names) - keys)}")
    if batch.images is None and batch.stats is None:
        raise BatchFileError(f"{path}: holds neither images (arr_0) nor statistics (mu, sigma); "
                             f"keys: {sorted(keys)}")
    return batch


FeatureExtractor = Callable[[np.ndarray], Mapping[str, np.ndarray]]
"""uint8 images (n, H, W, 3) -> {'pool': (n, D)} plus, where the network has them,
'logits' (n, K) for the Inception Score and 'spatial' (n, S) for sFID."""


def sharded_extractor(apply_fn: Callable, variables, *, batch_size: int,
                      mesh: jax.sharding.Mesh | None = None) -> FeatureExtractor:
    """Wrap `apply_fn(variables, images uint8 (B, H, W, 3)) -> {name: (B, ...)}` into a
    `FeatureExtractor` that runs fixed-size batches sharded over `mesh` (default: every
    device), padding the last one, so each input shape compiles once."""
    mesh = mesh or sharding.create_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    devices = mesh.devices.size
    batch_size = -(-batch_size // devices) * devices
    variables = jax.device_put(variables, sharding.replicated(mesh))
    in_sharding = sharding.batch_sharding(mesh, 4)
    run = jax.jit(apply_fn, out_shardings=sharding.batch_sharding(mesh, 2))

    def extract(images: np.ndarray) -> dict[str, np.ndarray]:
        outputs: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(images), batch_size):
            chunk = np.asarray(images[start:start + batch_size])
            n = len(chunk)
            if n < batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
            with sharding.mesh_context(mesh):
                result = run(variables, jax.device_put(chunk, in_sharding))
            for name, value in result.items():
                outputs.setdefault(name, []).append(np.asarray(value, np.float32)[:n])
        return {name: np.concatenate(parts) for name, parts in outputs.items()}

    return extract


def inception_extractor(path: str | os.PathLike, *, batch_size: int = 200,
                        mesh: jax.sharding.Mesh | None = None,
                        preprocess: str = "pytorch_fid") -> FeatureExtractor:
    """pytorch-fid's FID Inception (`pt_inception-2015-12-05-6726825d.pth`) as a sharded
    extractor: pool3 (2048) for FID and precision / recall, the ADM evaluator's softmax logits
    for IS, mixed_6 spatial features (2023) for sFID. `preprocess`: 'pytorch_fid' (its resize
    and scaling) or 'adm' (the ADM evaluator's TF graph's; `eval_jax.inception`)."""
    from eval_jax.inception import InceptionV3
    from eval_jax.inception_convert import params_from_torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--inception {path} does not exist; download pytorch-fid's weights: "
            "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
            "pt_inception-2015-12-05-6726825d.pth")
    model = InceptionV3(preprocess=preprocess)
    variables = params_from_torch(path, model)

    def apply(v, images):
        out = model.apply(v, images)
        return {"pool": out["pool3"], "logits": out["logits_unbiased"],
                "spatial": out["spatial"]}

    return sharded_extractor(apply, variables, batch_size=batch_size, mesh=mesh)


def _features(batch: Batch, extract: FeatureExtractor | None, what: str) -> dict | None:
    if batch.images is None:
        return None
    if extract is None:
        raise BatchFileError(f"{batch.path} holds images: a feature network is needed "
                             f"(--inception) to compute the {what}")
    return dict(extract(batch.images))


def evaluate(samples: Batch, reference: Batch, extract: FeatureExtractor | None,
             *, pr_neighbours: int = 3, is_split: int = 5000,
             pr_distances: str = "float16") -> dict[str, float]:
    """ADM-evaluator metrics of `samples` against `reference` (see the module docstring).

    Statistics stored in a file take precedence over its images (as in the ADM evaluator);
    a metric is left out when the inputs do not allow it (e.g. IS without sample images)."""
    sample_feats = _features(samples, extract, "sample features")
    ref_feats = _features(reference, extract, "reference features")

    def stats(batch, feats, field, name):
        if getattr(batch, field) is not None:
            return getattr(batch, field)
        if feats is not None and name in feats:
            return metrics.feature_statistics(feats[name])
        return None

    result: dict[str, float] = {}
    s, r = stats(samples, sample_feats, "stats", "pool"), stats(reference, ref_feats, "stats",
                                                                 "pool")
    if s is None or r is None:
        raise BatchFileError("FID needs statistics or images on both sides")
    if s[0].shape != r[0].shape:
        raise BatchFileError(f"feature sizes differ: {samples.path} {s[0].shape} vs "
                             f"{reference.path} {r[0].shape} (statistics of another network?)")
    result["fid"] = metrics.frechet_distance(*s, *r)
    s_sp = stats(samples, sample_feats, "spatial_stats", "spatial")
    r_sp = stats(reference, ref_feats, "spatial_stats", "spatial")
    if s_sp is not None and r_sp is not None:
        result["sfid"] = metrics.frechet_distance(*s_sp, *r_sp)
    if sample_feats is not None and "logits" in sample_feats:
        result["is"] = metrics.inception_score(sample_feats["logits"], splits_of=is_split)
    if sample_feats is not None and ref_feats is not None:
        fewest = min(len(ref_feats["pool"]), len(sample_feats["pool"]))
        if fewest <= pr_neighbours:
            raise BatchFileError(f"precision / recall with k = {pr_neighbours} neighbours need "
                                 f"more than {pr_neighbours} images on each side; "
                                 f"{samples.path}: {len(sample_feats['pool'])}, "
                                 f"{reference.path}: {len(ref_feats['pool'])}")
        precision, recall = metrics.precision_recall(ref_feats["pool"], sample_feats["pool"],
                                                     k=pr_neighbours, distances=pr_distances)
        result.update(precision=precision, recall=recall)
    return {k: float(v) for k, v in result.items()}


def save_statistics(path: str | os.PathLike, features: Mapping[str, np.ndarray],
                    images: np.ndarray | None = None) -> None:
    """Write an ADM-format reference batch: `mu`/`sigma` (+ `mu_s`/`sigma_s`), optionally the
    images as `arr_0`. As `np.savez`, `.npz` is added to a path without it. The file is written
    under a temporary name and renamed: later evaluations read it as their reference, so it
    must never be left half-written."""
    out = {}
    out["mu"], out["sigma"] = metrics.feature_statistics(features["pool"])
    if "spatial" in features:
        out["mu_s"], out["sigma_s"] = metrics.feature_statistics(features["spatial"])
    if images is not None:
        out["arr_0"] = images
    path = os.fspath(path)
    path = path if path.endswith(".npz") else path + ".npz"
    tmp = path.removesuffix(".npz") + f".{os.getpid()}.tmp.npz"
    try:
        np.savez(tmp, **out)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def uint8_from_model_range(x: jax.Array) -> jax.Array:
    """[-1, 1] images -> uint8 exactly as upstream writes its PNGs: clamp(127.5 x + 128)
    then a truncating cast."""
    return jnp.clip(127.5 * x + 128.0, 0, 255).astype(jnp.uint8)
