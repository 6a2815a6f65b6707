"""Guided sampling speed of LightningDiT: one CFG velocity call, and a whole Euler sample.

    python -m bench.sample --variant B/1 --batch 8
    python -m bench.sample --variant XL/1 --batch 8 --num_steps 250

As upstream's inference (configs/lightningdit.py:xl1_800ep sampling: cfg 6.7, guidance interval
from t = 0.125, 3 guided channels, timestep shift 0.3):
  calls_per_s  one guided velocity evaluation (`dit_jax.samplers.guided_velocity_fn`) at t = 0.5
               on `batch` = batch/2 conditional + batch/2 unconditional rows (upstream's
               `forward_with_cfg` on a doubled batch), jitted;
  sample_s     one whole jitted `sample_latents` run: `--num_steps` grid points (num_steps - 1
               Euler calls) for batch/2 images, after compilation (`--num_steps 0` skips it).
               Calls before the guidance interval run only the conditional half
               (`conditional_only_calls`; upstream runs both halves at every call);
               `sample_flops` counts what runs, `sample_flops_both_halves` upstream's work.
Random weights (`bench.common.random_params`). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bench import common
from bench.flops import lightningdit_forward_flops
from bench.train_step import dit_config
from dit_jax.samplers import guided_velocity_fn, sample_latents, time_grid
from launch import build

SAMPLING = "xl1_800ep"  # the configs/lightningdit.py variant whose sampling options are used


def sampling_options(num_steps: int) -> dict:
    from configs.lightningdit import get_config

    options = build.sampler_options(get_config(SAMPLING))
    options["num_steps"] = num_steps
    return options


def guided_call(variant: str = "B/1", batch: int = 8, dtype: str = "float32",
                attention: str = "", num_steps: int = 250) -> dict:
    """One guided velocity call at t = 0.5, compiled, with its inputs: a dict of config, model,
    params, noise, labels, t, options, guidance, call (compiled: call(params, noise, labels,
    t)), compile_s and flops_per_call."""
    if batch < 2 or batch % 2:
        raise SystemExit(f"--batch {batch}: must be even and at least 2 (conditional + "
                         f"unconditional halves)")
    config = dit_config(variant, dtype)
    config.model.attention_impl = common.check_attention(attention)
    model = build.dit_model(config)
    n = batch // 2
    s, c = model.input_size, model.in_channels
    params = common.random_params(jax.eval_shape(lambda r: nn.meta.unbox(model.init(
        r, jnp.zeros((1, s, s, c)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]),
        jax.random.key(0)))
    noise = jax.random.normal(jax.random.key(1), (n, s, s, c))
    labels = jax.random.randint(jax.random.key(2), (n,), 0, model.num_classes)
    options = sampling_options(num_steps)
    guidance = {k: options[k] for k in ("cfg_scale", "cfg_interval_start", "cfg_channels")}

    def call(params, x, labels, t):
        return guided_velocity_fn(model, params, labels, **guidance)(x, t)

    t = jnp.full((n,), 0.5, jnp.float32)
    compiled, compile_s = common.compile_timed(jax.jit(call), params, noise, labels, t)
    return {"config": config, "model": model, "params": params, "noise": noise,
            "labels": labels, "t": t, "options": options, "guidance": guidance,
            "call": compiled, "compile_s": compile_s,
            "flops_per_call": batch * lightningdit_forward_flops(build.dit_kwargs(config))}


def run(variant: str = "B/1", batch: int = 8, dtype: str = "float32", steps: int = 5,
        warmup: int = 2, num_steps: int = 250, attention: str = "") -> dict:
    if num_steps == 1 or num_steps < 0:
        raise SystemExit(f"--num_steps {num_steps}: at least 2 grid points (0 skips the whole "
                         f"sample)")
    built = guided_call(variant, batch, dtype, attention, num_steps)
    config, model, params, noise, labels, t, options, guidance, call = (built[k] for k in (
        "config", "model", "params", "noise", "labels", "t", "options", "guidance", "call"))
    n = batch // 2

    # -- one guided call at t = 0.5 ---------------------------------------------------------
    timing = common.time_calls(lambda: call(params, noise, labels, t), steps=steps,
                               warmup=warmup)
    flops_per_call = built["flops_per_call"]
    result = {
        "bench": "sample", "variant": config.model.variant, "batch": batch, "dtype": dtype,
        "attention": attention or "default",
        "steps": steps, "warmup": warmup, **guidance,
        "calls_per_s": 1.0 / timing["median_s"], "call_s": timing["median_s"],
        "call_min_s": timing["min_s"], "call_max_s": timing["max_s"],
        "call_tflops_per_s": flops_per_call / timing["median_s"] / 1e12,
        "flops_per_call": flops_per_call, "compile_s": built["compile_s"],
    }

    # -- a whole sample: num_steps - 1 Euler calls of the guided velocity ---------------------
    if num_steps > 0:
        sample = jax.jit(functools.partial(sample_latents, model, **options))
        compiled, sample_compile_s = common.compile_timed(sample, params, noise, labels)
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, noise, labels))
        calls = num_steps - 1
        unguided = int(np.sum(time_grid(num_steps, options["timestep_shift"])[:-1]
                              < options["cfg_interval_start"]))
        result.update(sample_s=time.perf_counter() - start, sample_images=n,
                      conditional_only_calls=unguided,
                      sample_flops=(calls - unguided) * flops_per_call
                      + unguided * flops_per_call // 2,
                      sample_flops_both_halves=calls * flops_per_call,
                      num_steps=num_steps, method=options["method"],
                      timestep_shift=options["timestep_shift"],
                      sample_compile_s=sample_compile_s)
        result["compile_s"] += sample_compile_s
    result.update(common.device_info())
    return result


def report(r: dict) -> None:
    print(f"{r['variant']} guided call, batch {r['batch']} ({r['batch'] // 2} cond + "
          f"{r['batch'] // 2} uncond), {r['dtype']} on {r['device']}: {r['calls_per_s']:.3f} "
          f"calls/s ({common.fmt_s(r['call_s'])}, min {common.fmt_s(r['call_min_s'])}; "
          f"{r['call_tflops_per_s']:.3f} TFLOP/s)")
    if "sample_s" in r:
        calls = r["num_steps"] - 1
        print(f"  {r['num_steps']}-point {r['method']} sample of {r['sample_images']} images: "
              f"{r['sample_s']:.2f} s ({common.fmt_s(r['sample_s'] / calls)}/call; "
              f"{r['conditional_only_calls']} of {calls} calls before the guidance interval, "
              f"conditional half only)")
    print(f"  compile {r['compile_s']:.1f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="B/1", help="B/1, XL/1, LightningDiT-L/2, tiny")
    parser.add_argument("--batch", type=common.positive_int, default=8,
                        help="rows per model call: half conditional, half unconditional")
    parser.add_argument("--num_steps", type=common.nonnegative_int, default=250,
                        help="grid points of the whole-sample timing (upstream's 250; 0: skip it)")
    common.attention_arg(parser)
    common.common_args(parser)
    args = parser.parse_args(argv)
    common.start(args)
    r = run(args.variant, args.batch, args.dtype, args.steps, args.warmup, args.num_steps,
            args.attention)
    report(r)
    common.emit(r)


if __name__ == "__main__":
    main()
