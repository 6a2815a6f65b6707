"""Sample latents from a LightningDiT: random init, a converted PyTorch file or orbax params.

    python -m launch.sample --config configs/lightningdit.py:tiny --workdir runs/demo

Writes to the workdir: `samples.npz` (latents NHWC float32, labels), `latents_preview.png`
(first three latent channels) and `config.json`. Sampling is one jitted `lax.scan`, data-
parallel over the mesh in `config.mesh`.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import linen as nn
from ml_collections import config_flags

from dit_jax.convert import params_from_torch
from dit_jax.samplers import sample_latents
from launch import build, images, params_io, sharding
from launch.latent_stats import denormalize, load_latent_stats

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path:variant).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Upstream .pt/.safetensors, an orbax params directory or a training "
    "run's workdir (its latest EMA weights); "
    "default: a randomly initialised model (outputs zero velocity: samples equal the noise).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 16, "Number of samples.")
_LABELS = flags.DEFINE_list("labels", None, "Class labels (cycled); default: random classes.")


def build_params(config, model, mesh, checkpoint: str | None):
    """Parameters born sharded over `mesh`: initialised, or loaded from `checkpoint`."""
    s = model.input_size
    init_args = (jnp.zeros((1, s, s, model.in_channels)), jnp.zeros((1,)),
                 jnp.zeros((1,), jnp.int32))
    init = lambda rng: model.init(rng, *init_args)["params"]
    rng = jax.random.key(config.seed)
    if checkpoint is None:
        return sharding.sharded_init(init, rng, mesh=mesh)[0]
    abstract_boxed = jax.eval_shape(init, rng)
    to_flax = lambda path: params_from_torch(path, **build.dit_architecture(config))
    return params_io.load_params(checkpoint, abstract=nn.meta.unbox(abstract_boxed),
                                 from_torch=to_flax,
                                 shardings=sharding.logical_shardings(abstract_boxed, mesh))


def main(argv):
    del argv
    config = _CONFIG.value
    workdir = _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    model = build.dit_model(config)
    mesh = sharding.create_mesh(dict(config.mesh))
    params = build_params(config, model, mesh, _CHECKPOINT.value)

    n = _NUM_SAMPLES.value
    rng_noise, rng_labels, rng_sde = jax.random.split(jax.random.key(config.seed + 1), 3)
    if _LABELS.value:
        labels = np.resize(np.array([int(v) for v in _LABELS.value], np.int32), n)
    else:
        labels = np.asarray(jax.random.randint(rng_labels, (n,), 0, model.num_classes))
    s, c = model.input_size, model.in_channels
    noise = np.asarray(jax.random.normal(rng_noise, (n, s, s, c), jnp.float32))

    opts = config.sample
    sampler = functools.partial(sample_latents, model, **build.sampler_options(config))
    batch_size = opts.batch_size
    devices = mesh.devices.size
    if batch_size % devices:
        raise ValueError(f"sample.batch_size {batch_size} must be a multiple of the "
                         f"{devices} devices of the mesh")
    batch_sh = sharding.batch_sharding(mesh, 4)
    with sharding.mesh_context(mesh):
        run = jax.jit(sampler, out_shardings=batch_sh)
        outputs, start = [], time.perf_counter()
        for i in range(0, n, batch_size):
            # pad the last batch to a full one: one compiled program for every batch
            idx = np.arange(i, i + batch_size) % n
            batch_noise = jax.device_put(noise[idx], batch_sh)
            batch_labels = jax.device_put(labels[idx], sharding.batch_sharding(mesh, 1))
            rng = jax.random.fold_in(rng_sde, i)
            out = run(params, batch_noise, batch_labels, rng)
            outputs.append(np.asarray(out)[: min(batch_size, n - i)])
        latents = np.concatenate(outputs)
    seconds = time.perf_counter() - start
    logging.info("sampled %d latents %s in %.1fs (%s, %d steps, cfg %.2f)", n,
                 latents.shape[1:], seconds, opts.method, opts.num_steps, opts.cfg_scale)

    if config.latent_stats:
        mean, std = load_latent_stats(config.latent_stats)
        latents = denormalize(latents, mean, std)
    np.savez(os.path.join(workdir, "samples.npz"), latents=latents, labels=labels)
    images.save_grid(os.path.join(workdir, "latents_preview.png"),
                     images.latent_preview(latents), upscale=max(1, 64 // s))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    summary = {"num_samples": n, "shape": list(latents.shape), "seconds": round(seconds, 2),
               "latent_mean": float(latents.mean()), "latent_std": float(latents.std())}
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
