"""Sample images from a LightningDiT: a labelled PNG grid, or 50,000 images for FID.

    # a grid from the tiny demo model (random weights unless --checkpoint)
    python -m launch.sample --config configs/lightningdit.py:tiny --workdir runs/samples
    # ADM-format batch for the paper's FID, from a released checkpoint (or a training workdir)
    python -m launch.sample --config configs/lightningdit.py:xl1_800ep --workdir runs/fid50k \
        --checkpoint lightningdit-xl-imagenet256-800ep.pt \
        --config.tokenizer.checkpoint vavae-imagenet256-f16d32-dinov2.pt \
        --config.latent_stats latents_stats.pt \
        --num_samples 50000 --config.sample.batch_size 256

`--checkpoint`: an upstream `.pt`/`.safetensors` (its EMA weights), an orbax params directory,
or a `launch.train` workdir (its latest EMA weights). The latents are decoded by the VA-VAE of
`config.tokenizer` (a configs/vavae.py variant and its weights) after de-normalising with
`config.latent_stats` (or the statistics of `config.data.path`). Every sampler option is a
config field: --config.sample.{method,num_steps,cfg_scale,cfg_interval_start,timestep_shift,
cfg_channels,batch_size}.

Writes `samples.npz` (ADM layout: `arr_0` uint8 NHWC, `arr_1` labels; latents when no
tokenizer is configured) and `samples.png`, a grid of the first `--grid` samples with their
classes. Sampling runs over every device of every process in chunks of `--chunk_size`; rerun
the same command after a kill and the finished chunks are kept (see `launch.sampling`).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import linen as nn
from ml_collections import config_flags

from launch import build, cli, distributed, params_io, sampling, sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path:variant).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Upstream .pt/.safetensors, an orbax params directory or a training "
    "run's workdir (its latest EMA weights); default: a randomly initialised model (zero "
    "velocity: the samples are decoded noise).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 16, "Number of samples.")
_LABELS = flags.DEFINE_list("labels", None, "Class labels (cycled); default: random classes.")
_BALANCED = flags.DEFINE_bool("balanced", False,
                              "Each class equally often (random order) instead of random classes.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 1024,
                                   "Images per resumable chunk (rounded to whole batches).")
_MAX_CHUNKS = flags.DEFINE_integer("max_chunks", None,
                                   "Stop after writing this many new chunks (rerun to go on).")
_GRID = flags.DEFINE_integer("grid", 64, "Samples shown in samples.png (0: none).")


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
    if not os.path.exists(checkpoint):
        raise cli.UserError(f"--checkpoint {checkpoint!r} does not exist")
    abstract_boxed = jax.eval_shape(init, rng)
    to_flax = lambda path: params_from_torch(path, **build.dit_architecture(config))
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


def build_decoder(config, mesh):
    """(decode(params, latents) -> images in [-1, 1], params replicated) of
    `config.tokenizer`, or (None, None) without one."""
    if not config.tokenizer.variant:
        return None, None
    from configs.vavae import get_config
    from launch.data.extraction import load_autoencoder_params

    vavae_config = get_config(config.tokenizer.variant)
    vae = build.autoencoder(vavae_config)
    params = load_autoencoder_params(vavae_config, vae, config.tokenizer.checkpoint or None, mesh)
    return (lambda p, z: vae.apply({"params": p}, z, method=vae.decode)), params


def main(argv):
    del argv
    distributed.initialize()
    config, workdir = _CONFIG.value, _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    model = build.dit_model(config)
    mesh = sharding.create_mesh(dict(config.mesh))
    try:
        plan = sampling.make_plan(_NUM_SAMPLES.value, config.sample.batch_size,
                                  _CHUNK_SIZE.value, mesh.devices.size)
    except ValueError as e:
        raise cli.UserError(str(e)) from e
    if _LABELS.value:
        labels = np.resize(np.array([int(v) for v in _LABELS.value], np.int32), plan.num_samples)
        if labels.min() < 0 or labels.max() >= model.num_classes:
            raise cli.UserError(f"--labels must lie in [0, {model.num_classes})")
    else:
        labels = sampling.class_labels(plan.num_samples, model.num_classes, config.seed,
                                       _BALANCED.value)
    checkpoint = os.path.abspath(_CHECKPOINT.value) if _CHECKPOINT.value else None
    stats = latent_statistics(config)
    layout = {
        "model": config.model.variant, "checkpoint": checkpoint,
        "tokenizer": [config.tokenizer.variant, config.tokenizer.checkpoint],
        "latent_stats": None if stats is None else [float(np.sum(stats[0])),
                                                    float(np.sum(stats[1])), stats[2]],
        "num_samples": plan.num_samples, "batch_size": plan.batch_size,
        "chunk_size": plan.chunk_size, "seed": config.seed, "balanced": _BALANCED.value,
        "labels": _LABELS.value, "sample": config.sample.to_dict()}
    try:
        sampling.check_layout(workdir, layout)
    except sampling.LayoutMismatch as e:
        raise cli.UserError(str(e)) from e

    params = build_params(config, model, mesh, _CHECKPOINT.value)
    decode, decoder_params = build_decoder(config, mesh)
    if decode is not None and stats is None:
        logging.warning("no latent statistics (config.latent_stats, or latents in "
                        "config.data.path): decoding the samples as they are")
    noise_key, sde_key = jax.random.split(jax.random.key(config.seed + 1))
    generate_fn = sampling.make_generate(model, build.sampler_options(config), decode=decode,
                                         latent_stats=stats, noise_key=noise_key,
                                         sde_key=sde_key)
    start = time.perf_counter()
    written = sampling.generate(generate_fn, params, decoder_params, labels, plan, workdir,
                                mesh, max_chunks=_MAX_CHUNKS.value)
    seconds = time.perf_counter() - start
    missing = [k for k in range(plan.num_chunks)
               if not os.path.exists(sampling.chunk_path(workdir, k))]
    summary = {"num_samples": plan.num_samples, "images_made": written,
               "chunks_missing": len(missing), "seconds": round(seconds, 2),
               "images_per_s": round(written / seconds, 2) if written else 0}
    if missing or jax.process_index() != 0:
        print(json.dumps(summary))
        return
    output = os.path.join(workdir, "samples.npz")
    samples = sampling.assemble(workdir, plan, output)
    summary.update(output=output, shape=list(samples.shape))
    if _GRID.value:
        n = min(_GRID.value, len(samples))
        if samples.dtype == np.uint8:
            shown = samples[:n]
        else:
            from launch.images import latent_preview

            shown = latent_preview(samples[:n])
        grid = sampling.labelled_grid(shown, labels[:n])
        from PIL import Image

        Image.fromarray(grid).save(os.path.join(workdir, "samples.png"))
    logging.info("%d samples %s in %s (%s, %d steps, cfg %.2f)", plan.num_samples,
                 samples.shape[1:], output, config.sample.method, config.sample.num_steps,
                 config.sample.cfg_scale)
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
