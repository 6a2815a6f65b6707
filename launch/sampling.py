"""Sampling at scale as a library: N images from a LightningDiT, in resumable chunks.

`python -m launch.sample` is the command; `run_sampling` is the same as a function (the demo
calls it). What a run is:

- Sample i has its own noise, keyed by `fold_in(key, i)`, and its own label from one draw of
  all N labels (`class_labels`: random classes as upstream's inference, or balanced), and
  with `euler_maruyama` its own per-step SDE noise, keyed by `fold_in(sde_key, i)`. So the
  images do not depend on the batch size, the chunking or the number of devices and hosts.
- A global batch of `batch_size` samples is sharded over every device of every process; one
  jitted program integrates the ODE/SDE, de-normalises the latents with the training
  statistics, decodes them with the VA-VAE and converts to uint8 as upstream writes PNGs.
- Every `chunk_size` images are gathered and written by process 0 as
  `chunks/chunk_{k:05d}.npz` (written to a temporary name, then renamed). A rerun of the same
  command skips the finished chunks; `sampling.json` records the settings a rerun must share.
- `assemble` concatenates the chunks into one ADM-format `.npz` (`arr_0` uint8 NHWC images,
  `arr_1` labels) that the ADM evaluator and `launch.evaluate` read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn

from launch import build, cli, params_io, sharding
from launch import images as image_grids
from launch.data.sources import is_url

LAYOUT_FILE = "sampling.json"
OLD_LAYOUT_FILE = "json"  # the name in runs of 2026-11 (read when LAYOUT_FILE is absent)
CHUNK_DIR = "chunks"


class LayoutMismatch(ValueError):
    """A rerun whose settings differ from the run that wrote the chunks."""


def class_labels(num_samples: int, num_classes: int, seed: int, balanced: bool) -> np.ndarray:
    """(N,) int32 labels: uniform random classes, or each class N / num_classes times (+1 for
    the first N % num_classes) in a random order."""
    key = jax.random.key(seed)
    if not balanced:
        return np.asarray(jax.random.randint(key, (num_samples,), 0, num_classes), np.int32)
    labels = np.arange(num_samples, dtype=np.int32) % num_classes
    return labels[np.asarray(jax.random.permutation(key, num_samples))]


@dataclasses.dataclass(frozen=True)
class Plan:
    """How N samples are split: global batches of `batch_size`, chunks of `chunk_size`."""

    num_samples: int
    batch_size: int
    chunk_size: int

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def chunk_range(self, k: int) -> tuple[int, int]:
        start = k * self.chunk_size
        return start, min(start + self.chunk_size, self.num_samples)


def make_plan(num_samples: int, batch_size: int, chunk_size: int, num_devices: int) -> Plan:
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"sample.batch_size {batch_size} and --chunk_size {chunk_size} must "
                         f"be positive")
    if batch_size % num_devices:
        raise ValueError(f"sample.batch_size {batch_size} must be a multiple of the "
                         f"{num_devices} devices")
    chunk_size = max(batch_size, -(-chunk_size // batch_size) * batch_size)
    return Plan(num_samples, batch_size, chunk_size)


def make_generate(model, sampler_options: dict, *, decode: Callable | None,
                  latent_stats: tuple[np.ndarray, np.ndarray, float] | None,
                  noise_key: jax.Array, sde_key: jax.Array) -> Callable:
    """`generate(params, decoder_params, indices (B,), labels (B,))` -> uint8 images (B, H, W, 3)
    (or float32 NHWC latents when `decode` is None), un-jitted.

    `decode(decoder_params, latents NHWC) -> images in [-1, 1]`; `latent_stats` is
    (mean (C,), std (C,), multiplier) of the DiT's training latents."""
    from dit_jax.samplers import sample_latents

    shape = (model.input_size, model.input_size, model.in_channels)

    def generate(params, decoder_params, indices, labels):
        def per_sample(key):  # one key per sample, from its index
            return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)

        noise = jax.vmap(lambda key: jax.random.normal(key, shape))(per_sample(noise_key))
        x = sample_latents(model, params, noise, labels, per_sample(sde_key), **sampler_options)
        if latent_stats is not None:
            mean, std, multiplier = latent_stats
            x = x * jnp.asarray(std) / multiplier + jnp.asarray(mean)
        if decode is None:
            return x.astype(jnp.float32)
        images = decode(decoder_params, x)
        return jnp.clip(127.5 * images + 128.0, 0, 255).astype(jnp.uint8)

    return generate


def check_layout(workdir: str, layout: dict, record: bool = True) -> None:
    """Refuse a rerun whose settings differ from the `layout` recorded in `workdir`; in a new
    run, record it (with `record`: once the weights it names have loaded)."""
    path = os.path.join(workdir, LAYOUT_FILE)
    stored_at = next((p for p in (path, os.path.join(workdir, OLD_LAYOUT_FILE))
                      if os.path.exists(p)), None)
    if stored_at is not None:
        with open(stored_at) as f:
            stored = json.load(f)
        if stored != layout:
            diff = sorted(k for k in set(stored) | set(layout) if stored.get(k) != layout.get(k))
            raise LayoutMismatch(
                f"{workdir} holds samples made with other settings ({', '.join(diff)}: "
                f"{[stored.get(k) for k in diff]} there vs {[layout.get(k) for k in diff]} "
                f"now); use another --workdir or delete it")
        return
    if record and jax.process_index() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(layout, f, indent=2, sort_keys=True)
        os.replace(tmp, path)


def chunk_path(workdir: str, k: int) -> str:
    return os.path.join(workdir, CHUNK_DIR, f"chunk_{k:05d}.npz")


def _global_array(values: np.ndarray, array_sharding) -> jax.Array:
    """The same host array on every process -> one global array sharded over all devices."""
    return jax.make_array_from_callback(values.shape, array_sharding, lambda idx: values[idx])


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def generate(generate_fn: Callable, params, decoder_params, labels: np.ndarray, plan: Plan,
             workdir: str, mesh, *, max_chunks: int | None = None, progress: bool = True) -> int:
    """Write the missing chunks of `plan` to `workdir/chunks`; returns how many images were made.

    `generate_fn` comes from `make_generate`; `labels` holds all N labels. `max_chunks` stops
    after that many new chunks (to split a long job over time slots)."""
    os.makedirs(os.path.join(workdir, CHUNK_DIR), exist_ok=True)
    done = np.array([os.path.exists(chunk_path(workdir, k)) for k in range(plan.num_chunks)],
                    np.int32)
    if jax.process_count() > 1:  # process 0 writes the chunks: its view decides for all
        from jax.experimental import multihost_utils

        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    missing = [k for k in range(plan.num_chunks) if not done[k]]
    todo = missing if max_chunks is None else missing[:max_chunks]
    done_before = plan.num_chunks - len(missing)
    if done_before:
        logging.info("resuming: %d of %d chunks already written", done_before, plan.num_chunks)
    if not todo:
        return 0
    made = 0
    batch_1d = sharding.batch_sharding(mesh, 1)
    with sharding.mesh_context(mesh):
        run = jax.jit(generate_fn)
        bar = _progress(plan, done_before, enabled=progress and jax.process_index() == 0)
        for k in todo:
            start, stop = plan.chunk_range(k)
            outputs = []
            for b in range(start, stop, plan.batch_size):
                # a short last batch repeats indices: every batch has the compiled shape
                idx = np.arange(b, b + plan.batch_size) % plan.num_samples
                out = run(params, decoder_params, _global_array(idx.astype(np.int32), batch_1d),
                          _global_array(labels[idx], batch_1d))
                outputs.append(_to_host(out)[: stop - b])
                bar.update(min(plan.batch_size, stop - b))
            made += stop - start
            if jax.process_index() == 0:
                _write_chunk(chunk_path(workdir, k), np.concatenate(outputs), labels[start:stop])
        bar.close()
    return made


def _write_chunk(path: str, samples: np.ndarray, labels: np.ndarray) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, samples=samples, labels=labels)
    os.replace(tmp, path)


def _progress(plan: Plan, done_chunks: int, enabled: bool):
    from tqdm import tqdm

    done = min(done_chunks * plan.chunk_size, plan.num_samples)
    return tqdm(total=plan.num_samples, initial=done, unit="img", disable=not enabled,
                smoothing=0.1, dynamic_ncols=True)


def assemble(workdir: str, plan: Plan, output: str) -> np.ndarray:
    """Concatenate the chunks into one ADM-format `.npz` (`arr_0` samples, `arr_1` labels);
    returns the samples. Raises if a chunk is missing or has the wrong size."""
    samples, labels = [], []
    for k in range(plan.num_chunks):
        path = chunk_path(workdir, k)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: rerun the sampling command to finish")
        with np.load(path) as chunk:
            start, stop = plan.chunk_range(k)
            if len(chunk["samples"]) != stop - start:
                raise ValueError(f"{path} holds {len(chunk['samples'])} samples, expected "
                                 f"{stop - start}")
            samples.append(chunk["samples"])
            labels.append(chunk["labels"])
    samples, labels = np.concatenate(samples), np.concatenate(labels)
    tmp = output + ".tmp.npz"
    np.savez(tmp, arr_0=samples, arr_1=labels)
    os.replace(tmp, output)
    return samples


# -- the whole command as a library function ----------------------------------------------


def build_params(config, model, mesh, checkpoint: str | None):
    """Parameters born sharded over `mesh`: initialised, or loaded from `checkpoint`."""
    from dit_jax.convert import params_from_torch

    s = model.input_size
    init_args = (jnp.zeros((1, s, s, model.in_channels)), jnp.zeros((1,)),
                 jnp.zeros((1,), jnp.int32))
    init = lambda rng: model.init(rng, *init_args)["params"]
    rng = jax.random.key(config.seed)
    if checkpoint is None:
        logging.warning("no --checkpoint: sampling from a RANDOMLY INITIALISED LightningDiT")
        return sharding.sharded_init(init, rng, mesh=mesh)[0]
    abstract_boxed = jax.eval_shape(init, rng)
    to_flax = lambda path: params_from_torch(path, model)
    return params_io.load_params(checkpoint, abstract=nn.meta.unbox(abstract_boxed),
                                 from_torch=to_flax,
                                 shardings=sharding.logical_shardings(abstract_boxed, mesh))


def latent_statistics(config) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(mean, std, multiplier) that turn samples back into VA-VAE latents, or None."""
    from launch.latent_stats import load_latent_stats

    multiplier = float(config.data.get("latent_multiplier", 1.0))
    if config.latent_stats:
        if not os.path.exists(config.latent_stats):
            raise cli.UserError(f"config.latent_stats {config.latent_stats!r} does not exist")
        return (*load_latent_stats(config.latent_stats), multiplier)
    data = config.data
    if data.get("latent_norm") and data.path and os.path.isdir(data.path):
        from launch.data.latents import LatentShardSource, load_or_compute_stats

        return (*load_or_compute_stats(LatentShardSource(data.path)), multiplier)
    return None


def build_decoder(config, mesh, latent_channels: int | None = None):
    """(decode(params, latents) -> images in [-1, 1], params replicated) of
    `config.tokenizer`, or (None, None) without one; `latent_channels`: what the DiT makes,
    checked against the tokenizer's."""
    if not config.tokenizer.variant:
        if config.tokenizer.checkpoint:  # the weights alone would be ignored: latents come out
            raise cli.UserError(
                f"config.tokenizer.checkpoint {config.tokenizer.checkpoint!r} needs "
                f"config.tokenizer.variant, the configs/vavae.py variant of those weights "
                f"(long_stage3 for the released vavae-imagenet256-f16d32-dinov2.pt)")
        return None, None
    from configs.vavae import get_config
    from launch.data.extraction import load_autoencoder_params

    try:
        vavae_config = get_config(config.tokenizer.variant)
    except ValueError as e:
        raise cli.UserError(f"config.tokenizer.variant: {e}") from e
    if latent_channels is not None and vavae_config.model.embed_dim != latent_channels:
        raise cli.UserError(f"config.tokenizer.variant {config.tokenizer.variant!r} decodes "
                            f"{vavae_config.model.embed_dim}-channel latents; the model makes "
                            f"{latent_channels} (config.model.in_channels)")
    vae = build.autoencoder(vavae_config)
    params = load_autoencoder_params(vavae_config, vae, config.tokenizer.checkpoint or None, mesh)
    return (lambda p, z: vae.apply({"params": p}, z, method=vae.decode)), params


def run_sampling(config, workdir: str, *, checkpoint: str | None, num_samples: int,
                 labels: list[int] | None = None, balanced: bool = False,
                 chunk_size: int = 1024, max_chunks: int | None = None,
                 grid: int = 64) -> dict:
    """Everything the command does (see the module docstring); returns its summary."""
    if is_url(workdir):
        raise cli.UserError(f"--workdir {workdir}: sampling writes through the local file "
                            f"system; give a path (a local disk, NFS or a gcsfuse mount)")
    os.makedirs(workdir, exist_ok=True)
    model = build.dit_model(config)
    mesh = sharding.create_mesh(dict(config.mesh))
    try:
        plan = make_plan(num_samples, config.sample.batch_size, chunk_size,
                                  mesh.devices.size)
    except ValueError as e:
        raise cli.UserError(str(e)) from e
    if labels:
        try:
            labels = [int(v) for v in labels]
        except ValueError as e:
            raise cli.UserError(f"--labels {','.join(map(str, labels))}: class indices are "
                                f"integers ({e})") from e
        all_labels = np.resize(np.array(labels, np.int32), plan.num_samples)
        if all_labels.min() < 0 or all_labels.max() >= model.num_classes:
            raise cli.UserError(f"--labels must lie in [0, {model.num_classes})")
    else:
        all_labels = class_labels(plan.num_samples, model.num_classes, config.seed,
                                           balanced)
    if checkpoint and not os.path.exists(checkpoint):
        raise cli.UserError(f"--checkpoint {checkpoint!r} does not exist")
    stats = latent_statistics(config)
    if stats is not None and np.shape(stats[0]) != (model.in_channels,):
        source = config.get("latent_stats") or f"of the latents in {config.data.path}"
        raise cli.UserError(f"the latent statistics ({source}) have shape "
                            f"{np.shape(stats[0])}; the model takes {model.in_channels} "
                            f"channels (config.model.in_channels)")
    dtype = config.model.get("dtype", "float32")
    layout = {
        # the compute dtype changes the images (float32 runs keep the name alone, as before)
        "model": config.model.variant if dtype == "float32" else f"{config.model.variant} "
                                                                 f"({dtype})",
        "checkpoint": os.path.abspath(checkpoint) if checkpoint else None,
        "tokenizer": [config.tokenizer.variant, config.tokenizer.checkpoint],
        "latent_stats": None if stats is None else [float(np.sum(stats[0])),
                                                    float(np.sum(stats[1])), stats[2]],
        "num_samples": plan.num_samples, "batch_size": plan.batch_size,
        "chunk_size": plan.chunk_size, "seed": config.seed, "balanced": balanced,
        "labels": [int(v) for v in labels] if labels else None,
        "sample": config.sample.to_dict()}
    if config.sample.method == "euler_maruyama":
        # since 2026-12-06 each sample has its own SDE noise (before: one draw per batch), so
        # a workdir begun before then is refused rather than finished with other noise
        layout["sde_noise"] = "per_sample"
    try:
        check_layout(workdir, layout, record=False)
    except LayoutMismatch as e:
        raise cli.UserError(str(e)) from e

    params = build_params(config, model, mesh, checkpoint)
    decode, decoder_params = build_decoder(config, mesh, model.in_channels)
    check_layout(workdir, layout)  # recorded once the weights it names have loaded
    if decode is not None and stats is None:
        logging.warning("no latent statistics (config.latent_stats, or latents in "
                        "config.data.path): decoding the samples as they are")
    noise_key, sde_key = jax.random.split(jax.random.key(config.seed + 1))
    generate_fn = make_generate(model, build.sampler_options(config), decode=decode,
                                         latent_stats=stats, noise_key=noise_key,
                                         sde_key=sde_key)
    start = time.perf_counter()
    made = generate(generate_fn, params, decoder_params, all_labels, plan, workdir,
                             mesh, max_chunks=max_chunks)
    seconds = time.perf_counter() - start
    missing = [k for k in range(plan.num_chunks)
               if not os.path.exists(chunk_path(workdir, k))]
    summary = {"num_samples": plan.num_samples, "images_made": made,
               "chunks_missing": len(missing), "seconds": round(seconds, 2),
               "images_per_s": round(made / seconds, 2) if made else 0}
    if missing or jax.process_index() != 0:
        return summary
    output = os.path.join(workdir, "samples.npz")
    samples = assemble(workdir, plan, output)
    summary.update(output=output, shape=list(samples.shape))
    if grid:
        n = min(grid, len(samples))
        if samples.dtype == np.uint8:
            shown = samples[:n]
        else:
            from launch.images import latent_preview

            shown = latent_preview(samples[:n])
        from PIL import Image

        Image.fromarray(image_grids.labelled_grid(shown, all_labels[:n])).save(
            os.path.join(workdir, "samples.png"))
    logging.info("%d samples %s in %s (%s, %d steps, cfg %.2f)", plan.num_samples,
                 samples.shape[1:], output, config.sample.method, config.sample.num_steps,
                 config.sample.cfg_scale)
    return summary
