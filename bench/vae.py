"""VA-VAE encode / decode speed: jitted encode (posterior sample, as upstream) and decode.

    python -m bench.vae --size 256 --batch 1
    python -m bench.vae --variant f16d32 --size 512 --batch 4 --dtype bfloat16

f16d32 is configs/vavae.py's autoencoder (16x downsampling, 32 latent channels); `--variant
tiny` is the CPU-sized test model. Random weights (`bench.common.random_params`).
encode_s: image -> posterior sample z; decode_s: z -> image (median of `--steps` calls each).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import linen as nn

from bench import common
from bench.flops import matmul_flops
from bench.train_step import vavae_config
from launch import build


def run(variant: str = "f16d32", size: int = 256, batch: int = 1, dtype: str = "float32",
        steps: int = 5, warmup: int = 2) -> dict:
    if batch < 1:
        raise SystemExit(f"--batch {batch}: must be at least 1")
    config = vavae_config(variant, dtype)
    ae = build.autoencoder(config, dtype=jnp.dtype(dtype))
    if size < 1 or size % ae.downsample_factor:
        raise SystemExit(f"--size {size}: must be a positive multiple of "
                         f"{ae.downsample_factor}")
    x = jnp.tanh(jax.random.normal(jax.random.key(1), (batch, size, size, 3)))
    params = common.random_params(jax.eval_shape(
        lambda r: nn.meta.unbox(ae.init({"params": r, "sample": r}, x[:1])["params"]),
        jax.random.key(0)))
    rng = jax.random.key(2)

    def encode(params, x, rng):
        return ae.apply({"params": params}, x, method=ae.encode).sample(rng)

    def decode(params, z):
        return ae.apply({"params": params}, z, method=ae.decode)

    enc, enc_compile_s = common.compile_timed(jax.jit(encode), params, x, rng)
    z = enc(params, x, rng)
    dec, dec_compile_s = common.compile_timed(jax.jit(decode), params, z)
    t_enc = common.time_calls(lambda: enc(params, x, rng), steps=steps, warmup=warmup)
    t_dec = common.time_calls(lambda: dec(params, z), steps=steps, warmup=warmup)
    enc_flops = matmul_flops(encode, params, x, rng) / batch
    dec_flops = matmul_flops(decode, params, z) / batch
    return {
        "bench": "vae", "variant": variant, "size": size, "batch": batch, "dtype": dtype,
        "latent_shape": list(z.shape[1:]), "steps": steps, "warmup": warmup,
        "encode_s": t_enc["median_s"], "encode_min_s": t_enc["min_s"],
        "encode_max_s": t_enc["max_s"],
        "decode_s": t_dec["median_s"], "decode_min_s": t_dec["min_s"],
        "decode_max_s": t_dec["max_s"],
        "encode_decode_s": t_enc["median_s"] + t_dec["median_s"],
        "encode_flops_per_image": enc_flops, "decode_flops_per_image": dec_flops,
        "tflops_per_s": batch * (enc_flops + dec_flops)
        / (t_enc["median_s"] + t_dec["median_s"]) / 1e12,
        "compile_s": enc_compile_s + dec_compile_s, **common.device_info(),
    }


def report(r: dict) -> None:
    print(f"VA-VAE {r['variant']} {r['size']}x{r['size']} batch {r['batch']} {r['dtype']} on "
          f"{r['device']} (latents {r['latent_shape']}): encode {common.fmt_s(r['encode_s'])}, "
          f"decode {common.fmt_s(r['decode_s'])} ({r['tflops_per_s']:.3f} TFLOP/s), compile "
          f"{r['compile_s']:.1f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="f16d32",
                        help="f16d32, any configs/vavae.py variant, or tiny")
    parser.add_argument("--size", type=common.positive_int, default=256,
                        help="image height = width")
    parser.add_argument("--batch", type=common.positive_int, default=1)
    common.common_args(parser)
    args = parser.parse_args(argv)
    common.start(args)
    r = run(args.variant, args.size, args.batch, args.dtype, args.steps, args.warmup)
    report(r)
    common.emit(r)


if __name__ == "__main__":
    main()
