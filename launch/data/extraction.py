"""Latent extraction as a library: `extract_latents(config, workdir, checkpoint)`.

The command `python -m launch.extract_latents` (see it for the behaviour and the layout) and
the LightningDiT tiny config's self-prepared latents both call `extract_latents`.
"""


from __future__ import annotations

import json
import math
import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn
from jax.experimental import multihost_utils

from launch import agreement, cli, params_io, sharding
from launch.build import autoencoder
from launch.data import latents as latent_files
from launch.data.image_pipeline import prepare_source
from launch.data.pipeline import read_options
from launch.data.preprocess import decode_rgb, to_model_range
from launch.data.sources import DataError, ImageSource, reject_url

LAYOUT_FILE = "extraction.json"  # what a resumed run must agree with
SUMMARY_FILE = "summary.json"
KEEP_SHARDS = ("the shards written so far are kept: fix the input and rerun the same command to "
               "continue")


class LoadForExtraction(grain.transforms.Map):
    """Position in this process's item list -> center-cropped image, or a skip marker."""

    def __init__(self, source: ImageSource, items: np.ndarray, image_size: int):
        self.source, self.items, self.image_size = source, items, image_size

    def map(self, position: int) -> dict:
        from PIL import Image

        from launch.data.preprocess import center_crop_arr

        index = int(self.items[position])
        blank = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        try:
            example = self.source[index]
            image = center_crop_arr(Image.fromarray(decode_rgb(example.data)), self.image_size)
            return {"image": np.ascontiguousarray(image), "label": np.int64(example.label),
                    "index": np.int64(index), "ok": np.bool_(True)}
        except Exception:  # noqa: BLE001 (an undecodable image is skipped and counted)
            return {"image": blank, "label": np.int64(-1), "index": np.int64(index),
                    "ok": np.bool_(False)}


def extraction_source(data) -> ImageSource:
    """Every image of `data`, as upstream's extract_features.py reads them with torchvision's
    ImageFolder: `data.exclude` (upstream's VA-VAE training list leaves n06596364_9591.JPEG
    out) applies to VA-VAE training only."""
    data = data.copy_and_resolve_references()
    if "exclude" in data:
        data.exclude = ()
    return prepare_source(data)


def load_autoencoder_params(config, model, checkpoint: str | None, mesh):
    """Autoencoder params replicated on `mesh`, from `checkpoint` or random (tiny only)."""
    from vavae_jax.convert import abstract_params, params_from_torch

    abstract = abstract_params(model)
    replicated = sharding.replicated(mesh)
    if checkpoint is None:
        if not config.get("random_weights_ok", False):
            raise cli.UserError("--checkpoint is required (a VA-VAE .pt, an orbax params "
                                "directory or a training workdir); only the tiny config may "
                                "run on random weights")
        logging.warning("*" * 72)
        logging.warning("no VA-VAE weights (--checkpoint, config.tokenizer.checkpoint or "
                        "config.data.prepare_checkpoint): a RANDOMLY INITIALISED tiny VA-VAE")
        logging.warning("*" * 72)
        f = model.downsample_factor
        init = lambda: nn.meta.unbox(model.init(
            jax.random.key(config.seed), jnp.zeros((1, f, f, 3)), sample_posterior=False)["params"])
        return jax.jit(init, out_shardings=replicated)()
    if not os.path.exists(checkpoint):
        raise cli.UserError(f"--checkpoint {checkpoint!r} does not exist")
    params = params_io.load_params(
        checkpoint, abstract=abstract,
        from_torch=lambda path: params_from_torch(path, model))
    return jax.device_put(params, replicated)


def make_encoder(model, mesh, seed: int):
    """Jitted (params, images, mirrors, indices) -> (z, z_flip), NHWC float32, batch-sharded.

    The posterior noise of image i is keyed by (seed, i, view): independent of batching,
    hosts and resumption."""
    base = jax.random.key(seed)

    def encode(params, images, mirrors, indices):
        def sample(x, view):
            posterior = model.apply({"params": params}, to_model_range(x), method=model.encode)
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i), view))(
                indices)
            eps = jax.vmap(lambda k: jax.random.normal(k, posterior.mean.shape[1:]))(keys)
            return posterior.sample_with_eps(eps)

        return sample(images, 0), sample(mirrors, 1)

    batch = sharding.batch_sharding(mesh, 4)
    return jax.jit(encode, out_shardings=(batch, batch))


def check_layout(workdir: str, layout: dict) -> None:
    """Record the layout on the first run; a rerun must match it (or the shards would mix)."""
    path = os.path.join(workdir, LAYOUT_FILE)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != layout:
            diff = {k: (saved.get(k), v) for k, v in layout.items() if saved.get(k) != v}
            raise cli.UserError(f"{workdir} holds an extraction with different settings "
                                f"(saved vs now: {diff}); use another --workdir")
    elif jax.process_index() == 0:
        with open(path + ".tmp", "w") as f:
            json.dump(layout, f, indent=2)
        os.replace(path + ".tmp", path)


def shard_path(workdir: str, rank: int, shard: int) -> str:
    return os.path.join(workdir, latent_files.SHARD_PATTERN.format(rank=rank, shard=shard))


def shard_batches(source: ImageSource, shard_items: np.ndarray, data, local_batch: int):
    """This process's images of one shard, decoded by grain workers, in batches."""
    loader = grain.MapDataset.range(len(shard_items)).map(
        LoadForExtraction(source, shard_items, data.image_size))
    loader = loader.batch(local_batch).to_iter_dataset(
        read_options(data.read_threads, data.prefetch))
    if data.worker_count > 0:
        loader = loader.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
    return iter(loader)


class ShardEncoder:
    """Encodes one shard's images with every device of every process, in lock-step."""

    def __init__(self, model, params, mesh, seed: int, local_batch: int, image_size: int):
        self.params, self.mesh, self.local_batch = params, mesh, local_batch
        self.encode = make_encoder(model, mesh, seed)
        self.images_sharding = sharding.batch_sharding(mesh, 4)
        self.index_sharding = sharding.batch_sharding(mesh, 1)
        self.empty = {"image": np.zeros((0, image_size, image_size, 3), np.uint8),
                      "label": np.zeros((0,), np.int64), "index": np.zeros((0,), np.int64),
                      "ok": np.zeros((0,), bool)}

    def __call__(self, batches, num_batches: int, progress) -> tuple[dict, np.ndarray, str]:
        """Run `num_batches` global steps (every process runs as many, padding its own) and
        return this process's {'latents', 'latents_flip' NCHW, 'labels'}, skipped indices, and
        its input's error message ('' if none). An input error on one of several processes
        pads the shard's remaining steps, so the others are not left waiting in them; the
        processes then agree to stop (`launch.agreement`)."""
        outputs = {"latents": [], "latents_flip": [], "labels": []}
        skipped = []
        failure = ""
        put = jax.make_array_from_process_local_data
        for _ in range(num_batches):
            host = None
            if not failure:
                try:
                    host = next(batches, None)
                except DataError as e:
                    if jax.process_count() == 1:
                        raise
                    failure = str(e)
            host = host or self.empty  # no images left here (or unreadable): a padding batch
            real = len(host["index"])
            pad = self.local_batch - real
            images = np.pad(host["image"], ((0, pad), (0, 0), (0, 0), (0, 0)))
            indices = np.pad(host["index"], (0, pad)).astype(np.int32)
            z, z_flip = self.encode(
                self.params, put(self.images_sharding, images),
                put(self.images_sharding, np.ascontiguousarray(images[:, :, ::-1])),
                put(self.index_sharding, indices))
            keep = host["ok"]
            for key, value in (("latents", z), ("latents_flip", z_flip)):
                local = multihost_utils.global_array_to_host_local_array(
                    value, self.mesh, self.images_sharding.spec)
                outputs[key].append(np.asarray(local)[:real][keep].transpose(0, 3, 1, 2))
            outputs["labels"].append(host["label"][keep])
            skipped.append(host["index"][~keep])
            progress.update(real)
        return ({k: np.concatenate(v) for k, v in outputs.items()},
                np.concatenate(skipped).astype(np.int64), failure)


def extract_latents(config, workdir: str, checkpoint: str | None = None) -> None:
    """Encode `config.data`'s images into `workdir` (resumable; every process calls this)."""
    reject_url(workdir, "latent --workdir")
    os.makedirs(workdir, exist_ok=True)
    data = config.data
    source = extraction_source(data)
    rank, num_ranks = jax.process_index(), jax.process_count()
    mesh = sharding.create_mesh(dict(config.mesh))
    global_batch = config.extract.batch_size
    if global_batch < 1 or global_batch % mesh.devices.size or global_batch % num_ranks:
        raise cli.UserError(f"config.extract.batch_size={global_batch} must be a positive "
                            f"multiple of the {mesh.devices.size} devices and {num_ranks} "
                            f"processes")
    if config.extract.shard_size < 1:
        raise cli.UserError(f"config.extract.shard_size={config.extract.shard_size} must be "
                            f"positive")
    local_batch = global_batch // num_ranks
    shard_size = config.extract.shard_size
    n = len(source)
    check_layout(workdir, {"num_images": n, "num_processes": num_ranks,
                           "shard_size": shard_size, "image_size": data.image_size,
                           "seed": config.seed, "num_classes": source.num_classes})

    # process r owns images r, r + P, ...; every process loops over the same shards and
    # batches (padding its own), so the sharded steps stay in lock-step across hosts
    items = [np.arange(r, n, num_ranks) for r in range(num_ranks)]
    num_shards = math.ceil(len(items[0]) / shard_size)
    model = autoencoder(config)
    params = load_autoencoder_params(config, model, checkpoint, mesh)
    encode_shard = ShardEncoder(model, params, mesh, config.seed, local_batch, data.image_size)

    from tqdm import tqdm

    mine = items[rank]
    start, seen, num_skipped = time.perf_counter(), 0, 0
    with tqdm(total=len(mine), unit="img", disable=rank != 0, smoothing=0.1,
              desc=f"encoding {n} images") as progress:
        for shard in range(num_shards):
            lo, hi = shard * shard_size, (shard + 1) * shard_size
            owners = [r for r in range(num_ranks) if len(items[r][lo:hi])]
            if all(os.path.exists(shard_path(workdir, r, shard)) for r in owners):
                progress.update(len(mine[lo:hi]))  # complete on every process: done before a kill
                continue
            batches = shard_batches(source, mine[lo:hi], data, local_batch)
            num_batches = math.ceil(max(len(items[r][lo:hi]) for r in owners) / local_batch)
            try:
                outputs, skipped, failure = encode_shard(batches, num_batches, progress)
            finally:  # the shard's decoding workers stop, also when its input fails
                if hasattr(batches, "close"):
                    batches.close()
            names = [source.describe(int(i)) for i in skipped]
            for name in names[:10]:
                logging.warning("skipped undecodable image %s", name)
            seen, num_skipped = seen + len(mine[lo:hi]), num_skipped + len(names)
            if (not failure and seen >= data.bad_fraction_min_items
                    and num_skipped > data.max_bad_fraction * seen):
                failure = (f"{num_skipped} of {seen} images could not be decoded, more than "
                           f"config.data.max_bad_fraction={data.max_bad_fraction}; e.g. "
                           + ", ".join(names[:5]))
            # one process raises its DataError here; several agree first, so all stop together
            agreement.exchange(False, agreement.LocalFailure(f"in shard {shard}", failure)
                               if failure else None, remedy=KEEP_SHARDS)
            if len(mine[lo:hi]):
                latent_files.write_latent_shard(
                    shard_path(workdir, rank, shard), outputs["latents"], outputs["latents_flip"],
                    outputs["labels"],
                    metadata={"num_skipped": str(len(names)), "skipped": json.dumps(names)})
    seconds = time.perf_counter() - start
    logging.info("encoded %d images in %.1fs (%.1f img/s)", seen - num_skipped, seconds,
                 (seen - num_skipped) / max(seconds, 1e-9))

    multihost_utils.sync_global_devices("latent shards written")
    if rank == 0:
        write_stats_and_summary(workdir, config, num_ranks, seconds)


def write_stats_and_summary(workdir: str, config, num_ranks: int, seconds: float) -> None:
    from safetensors import safe_open

    shard_source = latent_files.LatentShardSource(workdir)
    if len(shard_source) == 0:
        raise DataError(f"no image of {shard_source.files[0]}... could be encoded: is "
                        "config.data.path right?")
    mean, std = latent_files.compute_latent_stats(shard_source, config.extract.stats_images,
                                                  seed=config.seed)
    latent_files.save_latent_stats(os.path.join(workdir, latent_files.STATS_FILE), mean, std)
    skipped = []
    for path in shard_source.files:
        with safe_open(path, "np") as f:
            skipped += json.loads(f.metadata().get("skipped", "[]"))
    summary = {"num_images": len(shard_source), "num_skipped": len(skipped),
               "skipped": skipped[:100], "num_shards": len(shard_source.files),
               "num_processes": num_ranks, "latent_shape": list(shard_source.latent_shape),
               "seconds_this_run": round(seconds, 2),
               "latent_mean": mean.tolist(), "latent_std": std.tolist()}
    tmp = os.path.join(workdir, SUMMARY_FILE + ".tmp")
    with open(tmp, "w") as f:  # renamed when complete: its presence means a finished run
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(workdir, SUMMARY_FILE))
    print(json.dumps({k: summary[k] for k in ("num_images", "num_skipped", "num_shards")}))
