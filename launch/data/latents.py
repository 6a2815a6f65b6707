"""Latent datasets in upstream's layout, and the LightningDiT latent pipeline.

A latent directory (written by `python -m launch.extract_latents` or upstream's
`extract_features.py`) holds `latents_rank{RR:02d}_shard{SSS:03d}.safetensors` files, each with
`latents` and `latents_flip` float32 (N, C, H, W) (NCHW, as upstream stores them) and `labels`
int64 (N,), plus `latents_stats.pt` = {'mean', 'std'} of shape (1, C, 1, 1).

The pipeline reads every shard (sorted by file name; the global index enumerates files, then
rows, as upstream's dataset does), takes `latents` or `latents_flip` with p = 0.5 per sample,
normalises with ``(z - mean) / std * multiplier`` and yields NHWC
{'latents': (B, H, W, C) float32, 'labels': (B,) int32}.
"""

from __future__ import annotations

import bisect
import glob
import os

import numpy as np
from absl import logging

from launch.data.pipeline import GlobalBatchIterator, make_global_iterator
from launch.data.sources import DataError, reject_url

SHARD_PATTERN = "latents_rank{rank:02d}_shard{shard:03d}.safetensors"
STATS_FILE = "latents_stats.pt"
LATENT_KEYS = ("latents", "latents_flip", "labels")
STATS_IMAGES = 10_000  # upstream computes the statistics over 10,000 random images


def write_latent_shard(path: str, latents: np.ndarray, latents_flip: np.ndarray,
                       labels: np.ndarray, metadata: dict[str, str] | None = None) -> None:
    """Write one shard atomically (temp file + rename): a killed run never leaves half a file.

    `latents` / `latents_flip` are NCHW float32; metadata as upstream's plus `metadata`."""
    from safetensors.numpy import save_file

    tensors = {"latents": np.ascontiguousarray(latents, np.float32),
               "latents_flip": np.ascontiguousarray(latents_flip, np.float32),
               "labels": np.ascontiguousarray(labels, np.int64)}
    meta = {"total_size": str(len(labels)), "dtype": "torch.float32", "device": "cpu",
            **(metadata or {})}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def list_shards(directory: str) -> list[str]:
    reject_url(directory, "latent directory")
    if os.path.isfile(directory):
        raise DataError(f"latent directory {directory!r} is a file, expected the directory of "
                        "latents_rank*_shard*.safetensors (config.data.path)")
    if not os.path.isdir(directory):
        raise DataError(f"latent directory {directory!r} does not exist (config.data.path)")
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise DataError(f"{directory!r} has no *.safetensors latent shards; extract them with "
                        "python -m launch.extract_latents")
    return files


class LatentShardSource:
    """Random access to the rows of every shard in a directory (picklable; lazy handles)."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        self.directory = directory
        self.files = list_shards(directory)
        counts, shape = [], None
        for path in self.files:
            try:
                with safe_open(path, "np") as f:
                    keys = set(f.keys())
                    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in LATENT_KEYS
                              if k in keys}
            except Exception as e:  # safetensors' errors do not name the file
                raise DataError(f"{path}: not a readable safetensors file (truncated or "
                                f"partly copied?): {e}") from None
            missing = set(LATENT_KEYS) - keys
            if missing:
                raise DataError(f"{path}: missing {sorted(missing)}, expected the keys "
                                f"{LATENT_KEYS} of upstream's latent shards")
            n = shapes["labels"][0] if shapes["labels"] else -1
            if (len(shapes["latents"]) != 4 or len(shapes["labels"]) != 1
                    or shapes["latents"] != shapes["latents_flip"] or shapes["latents"][0] != n):
                raise DataError(f"{path}: inconsistent shapes {shapes}, expected latents and "
                                "latents_flip (N, C, H, W) and labels (N,)")
            if shape is not None and shapes["latents"][1:] != shape:
                raise DataError(f"{path}: latents {shapes['latents'][1:]} (C, H, W) differ "
                                f"from {shape} in {self.files[0]}")
            shape = shapes["latents"][1:]
            counts.append(n)
        self.latent_shape = shape  # (C, H, W)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}

    def _locate(self, index: int) -> tuple[str, int]:
        file_index = bisect.bisect_right(self.offsets, index) - 1
        return self.files[file_index], index - self.offsets[file_index]

    def read(self, index: int, key: str) -> np.ndarray:
        from safetensors import safe_open

        path, row = self._locate(index)
        if path not in self._handles:
            self._handles[path] = safe_open(path, "np")
        return self._handles[path].get_slice(key)[row]

    def describe(self, index: int) -> str:
        path, row = self._locate(index)
        return f"{path}#{row}"

    def labels(self) -> np.ndarray:
        from safetensors import safe_open

        out = []
        for path in self.files:
            with safe_open(path, "np") as f:
                out.append(f.get_tensor("labels"))
        return np.concatenate(out)


def compute_latent_stats(source: LatentShardSource, num_images: int = STATS_IMAGES,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and unbiased std of `latents` over `num_images` random rows (all rows
    when there are fewer), over (N, H, W), as upstream's dataset computes them. (C,) each."""
    n = len(source)
    rows = np.arange(n) if n <= num_images else np.sort(
        np.random.default_rng(seed).choice(n, num_images, replace=False))
    sample = np.stack([source.read(int(i), "latents") for i in rows]).astype(np.float64)
    mean = sample.mean(axis=(0, 2, 3))
    std = sample.std(axis=(0, 2, 3), ddof=1)
    return mean.astype(np.float32), std.astype(np.float32)


def save_latent_stats(path: str, mean: np.ndarray, std: np.ndarray) -> None:
    """`latents_stats.pt` as upstream writes it: {'mean', 'std'} tensors (1, C, 1, 1); written
    to a temporary name and renamed, so a kill never leaves half a file under `path`."""
    import torch

    c = len(mean)
    tmp = f"{path}.tmp"
    torch.save({"mean": torch.from_numpy(np.asarray(mean, np.float32).reshape(1, c, 1, 1)),
                "std": torch.from_numpy(np.asarray(std, np.float32).reshape(1, c, 1, 1))}, tmp)
    os.replace(tmp, path)


def load_or_compute_stats(source: LatentShardSource) -> tuple[np.ndarray, np.ndarray]:
    from launch.latent_stats import load_latent_stats

    path = os.path.join(source.directory, STATS_FILE)
    if os.path.exists(path):
        mean, std = load_latent_stats(path)
    else:
        logging.warning("%s is missing: computing the statistics from %d random latents (not "
                        "written; the data directory may be read-only)", path,
                        min(len(source), STATS_IMAGES))
        mean, std = compute_latent_stats(source)
    c = source.latent_shape[0]
    if mean.shape != (c,):
        raise DataError(f"{path}: statistics for {mean.shape[0]} channels, latents have {c}")
    return mean, std


class LoadLatent:
    """record -> {'latents': (H, W, C) normalised float32, 'labels': int32}."""

    def __init__(self, source: LatentShardSource, mean, std, latent_norm: bool,
                 multiplier: float, flip: bool):
        self.source = source
        self.mean = np.asarray(mean, np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(-1, 1, 1)
        self.latent_norm = latent_norm
        self.multiplier = np.float32(multiplier)
        self.flip = flip

    def __call__(self, record: int, rng: np.random.Generator) -> dict:
        # upstream: `np.random.uniform() > 0.5` takes the stored image, else its mirror
        key = "latents" if not self.flip or rng.uniform() > 0.5 else "latents_flip"
        z = self.source.read(record, key).astype(np.float32)  # (C, H, W)
        if self.latent_norm:
            z = (z - self.mean) / self.std
        z = z * self.multiplier
        label = self.source.read(record, "labels")
        return {"latents": np.ascontiguousarray(z.transpose(1, 2, 0)),
                "labels": np.int32(label)}


def make_latent_iterator(data, *, global_batch_size: int, seed: int,
                         num_classes: int | None = None, latent_size: int | None = None,
                         channels: int | None = None, mesh=None, start_step: int = 0,
                         num_steps: int | None = None, process_index: int | None = None,
                         process_count: int | None = None) -> GlobalBatchIterator:
    """Global batches of normalised NHWC latents from `data.path` (a `config.data` block)."""
    source = LatentShardSource(data.path)
    c, h, w = source.latent_shape
    if (channels is not None and c != channels) or (latent_size is not None
                                                    and (h, w) != (latent_size, latent_size)):
        raise DataError(f"{data.path}: latents are (C, H, W) = {(c, h, w)}, the model expects "
                        f"{(channels, latent_size, latent_size)}")
    if num_classes is not None:
        labels = source.labels()
        if labels.min() < 0 or labels.max() >= num_classes:
            raise DataError(f"{data.path}: labels span [{labels.min()}, {labels.max()}], the "
                            f"model has num_classes={num_classes}")
    mean, std = (load_or_compute_stats(source) if data.latent_norm
                 else (np.zeros(c, np.float32), np.ones(c, np.float32)))
    load = LoadLatent(source, mean, std, data.latent_norm, data.latent_multiplier, data.flip)
    iterator = make_global_iterator(
        data, load, num_records=len(source), describe=source.describe, reason=None,
        global_batch_size=global_batch_size, seed=seed, mesh=mesh, start_step=start_step,
        num_steps=num_steps, process_index=process_index, process_count=process_count)
    logging.info("latent data: %s, %d latents (C, H, W) = %s in %d shards, %d steps per "
                 "epoch", data.path, len(source), source.latent_shape, len(source.files),
                 len(source) // global_batch_size)
    return iterator
