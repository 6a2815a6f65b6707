"""LightningDiT train-step and sampling throughput, variants measured side by side in one run.

    python -m bench.dit_throughput                       # CPU-sized default (tiny model)
    python -m bench.dit_throughput --variant LightningDiT-XL/1 --batch 32 --steps 20   # GPU/TPU

Reports img/s, ms/step and model TFLOP/s per device for: float32, bfloat16, bfloat16 + remat,
and the ratio of each to float32 measured in the same process. FLOPs use the 2*MAC convention
(matmuls incl. attention, x3 for a training step), as in anchors.md: XL/1 at 16x16 tokens is
~237 GFLOP per image forward.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
from flax import linen as nn

from bench.flops import lightningdit_forward_flops
from dit_jax import RELEASED_FLAGS, LightningDiT, lightningdit_kwargs
from dit_jax.train_step import init_train_state, make_optimizer, train_step
from launch import host_memory, xla_cpu


def time_fn(fn, *args, steps: int, warmup: int = 2) -> float:
    """Seconds per call after compilation (blocks on the result)."""
    out = None
    for _ in range(warmup):
        out = fn(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def bench_train(kwargs: dict, batch: int, steps: int) -> dict:
    model = LightningDiT(**kwargs)
    optimizer = make_optimizer()
    state = jax.jit(lambda r: nn.meta.unbox(init_train_state(model, optimizer, r)))(
        jax.random.key(0))
    s, c = kwargs["input_size"], kwargs["in_channels"]
    data = {"latents": jax.random.normal(jax.random.key(1), (batch, s, s, c)),
            "labels": jnp.zeros((batch,), jnp.int32)}
    step = jax.jit(functools.partial(train_step, model=model, optimizer=optimizer),
                   donate_argnums=0)

    def run(state_and_rng):
        st, rng = state_and_rng
        st, metrics = step(st, data, rng)
        return st, rng

    holder = [(state, jax.random.key(2))]

    def call():
        holder[0] = run(holder[0])
        return holder[0][0].step

    seconds = time_fn(call, steps=steps)
    return {"ms_per_step": 1e3 * seconds, "img_per_s": batch / seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="tiny",
                        help="registry name (e.g. LightningDiT-XL/1) or 'tiny'")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    host_memory.use_huge_pages()  # as the launch commands (restarts once on a CPU host)
    xla_cpu.add_cpu_flags()

    if args.variant == "tiny":
        base = dict(input_size=8, patch_size=1, in_channels=32, hidden_size=128, depth=4,
                    num_heads=4, num_classes=1000, use_swiglu=True, use_rope=True,
                    use_rmsnorm=True)
    else:
        base = lightningdit_kwargs(args.variant, **RELEASED_FLAGS)
    flops = 3 * lightningdit_forward_flops(base)  # training step ~ 3x forward
    variants = {
        "float32": dict(dtype=jnp.float32),
        "bfloat16": dict(dtype=jnp.bfloat16),
        "bfloat16+remat": dict(dtype=jnp.bfloat16, remat=True),
    }
    results = {}
    for name, extra in variants.items():
        r = bench_train({**base, **extra}, args.batch, args.steps)
        r["tflops_per_device"] = r["img_per_s"] * flops / 1e12 / jax.device_count()
        results[name] = r
    ref = results["float32"]["img_per_s"]
    for r in results.values():
        r["speed_vs_float32"] = r["img_per_s"] / ref
    print(json.dumps({"device": jax.devices()[0].device_kind, "variant": args.variant,
                      "batch": args.batch, "train_gflop_per_image": flops / 1e9,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
