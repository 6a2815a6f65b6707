"""Convolution kernel gradient: XLA's own against `vavae_jax.conv`'s per-tap matmuls, side by
side in one process, on the VA-VAE's largest layers.

    python -m bench.conv_grad                        # f16d32 layers at 256x256, batch 1
    python -m bench.conv_grad --layers tiny          # seconds-sized shapes (tests)

For each layer: the forward convolution, XLA's kernel gradient (``jax.vjp`` of
``lax.conv_general_dilated`` with respect to the kernel) and ours, each jitted alone and
timed (median of `--steps` after `--warmup`), the ratio XLA / ours, and the largest
difference relative to the gradient's largest entry. Off CPU (or on a sharded mesh) ours is
XLA's op, so the ratio is ~1 there by construction. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bench import common
from vavae_jax.conv import conv2d_nhwc

# (name, spatial size, in channels, out channels, kernel, stride, padding)
LAYERS = {
    "f16d32": [
        ("3x3 128->128 @256 (down_0, up_0)", 256, 128, 128, 3, 1, ((1, 1), (1, 1))),
        ("3x3 s2 128->128 @256 (downsample)", 256, 128, 128, 3, 2, ((0, 1), (0, 1))),
        ("3x3 128->128 @128 (down_1, up_1)", 128, 128, 128, 3, 1, ((1, 1), (1, 1))),
        ("3x3 256->256 @64 (down_2, up_2)", 64, 256, 256, 3, 1, ((1, 1), (1, 1))),
        ("3x3 512->512 @16 (mid, up_4)", 16, 512, 512, 3, 1, ((1, 1), (1, 1))),
        ("3x3 128->3 @256 (decoder conv_out)", 256, 128, 3, 3, 1, ((1, 1), (1, 1))),
        ("1x1 128->256 @64 (nin_shortcut)", 64, 128, 256, 1, 1, ((0, 0), (0, 0))),
        ("4x4 s2 64->128 @128 (discriminator)", 128, 64, 128, 4, 2, ((1, 1), (1, 1))),
    ],
    "tiny": [
        ("3x3", 16, 16, 16, 3, 1, ((1, 1), (1, 1))),
        ("4x4 s2", 16, 16, 32, 4, 2, ((1, 1), (1, 1))),
    ],
}


def xla_conv(x, kernel, stride, pads):
    return lax.conv_general_dilated(x, kernel, (stride, stride), pads,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def measure_layer(size, c_in, c_out, k, stride, pads, batch, steps, warmup) -> dict:
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, size, size, c_in))
    kernel = jax.random.normal(kk, (k, k, c_in, c_out)) / np.sqrt(k * k * c_in)
    y = xla_conv(x, kernel, stride, pads)
    g = jax.random.normal(kg, y.shape)

    forward = jax.jit(lambda x, w: xla_conv(x, w, stride, pads))
    ref = jax.jit(lambda x, w, g: jax.vjp(lambda w: xla_conv(x, w, stride, pads), w)[1](g)[0])
    ours = jax.jit(lambda x, w, g: jax.vjp(
        lambda w: conv2d_nhwc(x, w, (stride, stride), pads), w)[1](g)[0])
    want, got = ref(x, kernel, g), ours(x, kernel, g)
    err = float(jnp.abs(got - want).max() / jnp.abs(want).max())

    def seconds(fn, *args):
        return common.time_calls(lambda: fn(*args), steps=steps, warmup=warmup)["median_s"]

    fwd_s, xla_s, ours_s = seconds(forward, x, kernel), seconds(ref, x, kernel, g), seconds(
        ours, x, kernel, g)
    return {"forward_s": fwd_s, "xla_kernel_grad_s": xla_s, "ours_kernel_grad_s": ours_s,
            "ratio": xla_s / ours_s, "max_rel_diff": err}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="f16d32", choices=sorted(LAYERS))
    parser.add_argument("--batch", type=int, default=1)
    common.common_args(parser, steps=5, warmup=1)
    args = parser.parse_args(argv)
    common.start(args)
    if args.dtype != "float32":
        parser.error("--dtype: the VA-VAE trains in float32 here; bfloat16 is not measured")

    results = []
    print(f"{'layer':38s} {'forward':>9s} {'XLA grad':>9s} {'ours':>9s} {'ratio':>6s}")
    for name, size, c_in, c_out, k, stride, pads in LAYERS[args.layers]:
        r = measure_layer(size, c_in, c_out, k, stride, pads, args.batch, args.steps,
                          args.warmup)
        r.update(layer=name, shape=[args.batch, size, size, c_in], kernel=[k, k, c_in, c_out],
                 stride=stride)
        results.append(r)
        print(f"{name:38s} {common.fmt_s(r['forward_s']):>9s} "
              f"{common.fmt_s(r['xla_kernel_grad_s']):>9s} "
              f"{common.fmt_s(r['ours_kernel_grad_s']):>9s} {r['ratio']:5.2f}x", flush=True)
    total = (sum(r["xla_kernel_grad_s"] for r in results)
             / sum(r["ours_kernel_grad_s"] for r in results))
    common.emit({"bench": "conv_grad", "layers": args.layers, "batch": args.batch,
                 "steps": args.steps, "warmup": args.warmup, "ratio_all_layers": total,
                 "results": results, **common.device_info()})


if __name__ == "__main__":
    main()
