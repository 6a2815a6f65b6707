"""VA-VAE generator gradient: staged vjp (`generator_grads`) vs the straightforward formulation
(`reference_generator_grads`: one full gradient per adaptive-weight term, as upstream's
autograd.grad calls), measured side by side in one process.

    python -m bench.vavae_generator_step                      # tiny config, CPU
    python -m bench.vavae_generator_step --config long_stage3 --batch 8   # f16d32, accelerator

Random weights everywhere (the timing does not depend on their values).
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
from flax import linen as nn

from bench.dit_throughput import time_fn
from configs.vavae import get_config
from launch.build import vavae_models
from vavae_jax.reference_grads import reference_generator_grads
from vavae_jax.train_step import generator_grads, init_train_state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="configs/vavae.py variant")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)

    config = get_config(args.config)
    models, loss, (ae_opt, disc_opt) = vavae_models(config)
    size = config.data.image_size
    shape = (args.batch, size, size, 3)
    init = functools.partial(init_train_state, models, image_shape=shape, ae_optimizer=ae_opt,
                             disc_optimizer=disc_opt)
    state = jax.jit(lambda r: nn.meta.unbox(init(r)))(jax.random.key(0))
    x = jnp.tanh(jax.random.normal(jax.random.key(1), shape))
    frozen = {"lpips": None, "foundation": None}
    if models.lpips is not None:
        frozen["lpips"] = nn.meta.unbox(jax.jit(models.lpips.init)(jax.random.key(2), x, x)
                                        ["params"])
    latent = size // models.autoencoder.downsample_factor
    if models.foundation is not None:
        probe = jnp.zeros((1, 14 * latent, 14 * latent, 3))
        frozen["foundation"] = nn.meta.unbox(
            jax.jit(models.foundation.init)(jax.random.key(3), probe)["params"])
    eps = jax.random.normal(jax.random.key(4), (args.batch, latent, latent,
                                                models.autoencoder.embed_dim))
    inputs = (state.params, state.disc_params, state.disc_batch_stats, frozen, x, eps,
              jnp.int32(10_000))

    results = {}
    for name, fn in {"staged": generator_grads, "reference": reference_generator_grads}.items():
        jitted = jax.jit(functools.partial(fn, models=models, loss=loss))
        results[name] = {"ms_per_call": 1e3 * time_fn(jitted, *inputs, steps=args.steps)}
    results["speedup_staged_vs_reference"] = (results["reference"]["ms_per_call"]
                                              / results["staged"]["ms_per_call"])
    print(json.dumps({"device": jax.devices()[0].device_kind, "config": args.config,
                      "batch": args.batch, "image_size": size, "results": results}, indent=2))


if __name__ == "__main__":
    main()
