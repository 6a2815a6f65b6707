"""Training-step throughput, TFLOP/s, MFU and memory of the step the runtime jits.

    python -m bench.train_step --model lightningdit --variant B/1 --batch 8
    python -m bench.train_step --model lightningdit --variant XL/1 --batch 32 --dtype bfloat16
    python -m bench.train_step --model vavae --variant f16d32 --batch 1 --steps 3 --warmup 1

LightningDiT on 16x16x32 latents (upstream's ImageNet 256 setting; variants are the
`dit_jax.model.VARIANTS` names, `LightningDiT-B/1` or just `B/1`); the VA-VAE f16d32 at 256x256
(`configs/vavae.py:long_stage3`: generator step with DINOv2-L and LPIPS in the loop, then the
discriminator step). `--variant tiny` is a CPU-second-sized model of either family (tests),
`--variant demo` the one `launch.demo` trains (it trains LightningDiT at `--batch 64`, the
VA-VAE at `--batch 32`).

The step is the training loop's (`launch/training/adapters.py` + `launch/training/loop.py`):
`adapter.step` jitted with explicit shardings on a one-device mesh and the state donated; random
weights everywhere, the VA-VAE's frozen DINOv2 / LPIPS included (timing does not depend on the
values). Reported: images/s (median step), explicit `flops_per_image` (3 x forward, see
`bench.flops`) and XLA's count of the compiled step, TFLOP/s, MFU against `peak_tflops` (CPU: a
float32 matmul measured by this command; GPU/TPU: the chip's dense bf16 peak), peak memory,
compile time. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import math

import jax
import numpy as np

from bench import common
from bench.flops import lightningdit_forward_flops, matmul_flops
from configs import lightningdit as dit_configs
from configs import vavae as vavae_configs
from dit_jax.model import VARIANTS
from launch import build, sharding, xla_cpu
from launch.training.adapters import make_adapter

VAVAE_VARIANTS = {"f16d32": "long_stage3", "tiny": "tiny"}
DIT_CONFIG_VARIANTS = ("tiny", "demo")  # configs/lightningdit.py's own CPU-sized models
DEFAULT_BATCH = {"lightningdit": 8, "vavae": 1}


def dit_variant(name: str) -> str:
    """'B/1', 'XL/1' or 'LightningDiT-B/1' -> the registry name ('tiny', 'demo' stay)."""
    if name in DIT_CONFIG_VARIANTS or name in VARIANTS:
        return name
    full = f"LightningDiT-{name}"
    if full not in VARIANTS:
        raise SystemExit(f"unknown LightningDiT variant {name!r}: tiny, demo or one of "
                         f"{sorted(v.removeprefix('LightningDiT-') for v in VARIANTS)}")
    return full


def dit_config(variant: str, dtype: str):
    """configs/lightningdit.py with `variant`'s sizes (the released flags, 16x16x32 inputs)."""
    variant = dit_variant(variant)
    if variant in DIT_CONFIG_VARIANTS:
        config = dit_configs.get_config(variant)
    else:
        config = dit_configs.get_config("xl1_64ep")
        config.model.update(variant=variant, **VARIANTS[variant])
    config.model.dtype = dtype
    return config


def vavae_config(variant: str, dtype: str):
    """configs/vavae.py's `variant` ('f16d32' = long_stage3, 'tiny', or a config name) on
    random frozen weights."""
    try:
        config = vavae_configs.get_config(VAVAE_VARIANTS.get(variant, variant))
    except ValueError as error:
        raise SystemExit(f"VA-VAE --variant {variant!r}: f16d32 (= long_stage3) or a "
                         f"configs/vavae.py variant; {error}") from None
    config.model.dtype = dtype
    config.random_weights_ok = True  # frozen DINOv2 / LPIPS on random weights
    return config


def make_batch(model: str, adapter, batch: int) -> dict:
    """Random inputs as the loop feeds them (drawn with numpy: nothing to compile)."""
    rng = np.random.default_rng(0)
    if model == "lightningdit":
        m = adapter.model
        shape = (batch, m.input_size, m.input_size, m.in_channels)
        return {"latents": rng.standard_normal(shape, np.float32),
                "labels": rng.integers(0, m.num_classes, (batch,), np.int32)}
    s = adapter.image_size
    return {"image": rng.integers(0, 256, (batch, s, s, 3), np.uint8),
            "labels": rng.integers(0, 1000, (batch,), np.int32)}


def explicit_flops_per_image(model: str, adapter, state) -> tuple[float, str]:
    """Model FLOPs of one training image and how they were counted."""
    if model == "lightningdit":
        kwargs = build.dit_kwargs(adapter.config)
        return 3.0 * lightningdit_forward_flops(kwargs), "3 x lightningdit_forward_flops"
    return vavae_flops_per_image(adapter, state), "vavae_flops_per_image (dot/conv count)"


def vavae_flops_per_image(adapter, state) -> float:
    """The loop's VA-VAE count (`VAVAEAdapter.flops_per_example`: the same models and
    multipliers), with each forward counted over its dot / conv equations instead of XLA's
    cost analysis."""
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state.params)
    return adapter.flops_per_example(params, count=matmul_flops)


def compiled_step(model: str = "lightningdit", variant: str = "B/1", batch: int | None = None,
                  dtype: str = "float32", remat: bool = False, attention: str = "") -> dict:
    """The loop's step for `model` / `variant`, compiled on a one-device mesh, with its
    inputs: a dict of config, adapter, batch, compiled, compile_s, state, data, rng, frozen.
    `attention`: LightningDiT's config.model.attention_impl ('' = the backend's default)."""
    common.jnp_dtype(dtype)
    batch = DEFAULT_BATCH.get(model, 1) if batch is None else batch
    if batch < 1:
        raise SystemExit(f"--batch {batch}: must be at least 1")
    if model == "lightningdit":
        config = dit_config(variant, dtype)
        config.model.attention_impl = common.check_attention(attention)
    elif model == "vavae":
        if attention:
            raise SystemExit("--attention applies to LightningDiT only (the VA-VAE's "
                             "mid-block attention has one implementation)")
        config = vavae_config(variant, dtype)
    else:
        raise SystemExit(f"--model {model!r}: lightningdit or vavae")
    config.model.remat = remat
    adapter = make_adapter(config)

    # -- state, data and frozen tree on a one-device mesh, as the loop builds them ------------
    mesh = sharding.create_mesh((1, 1, 1), jax.devices()[:1])
    state, state_shardings = sharding.sharded_init(adapter.init_state, jax.random.key(0),
                                                   mesh=mesh)
    data = jax.tree.map(lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)),
                        make_batch(model, adapter, batch))
    frozen = adapter.frozen(mesh)
    rng = jax.random.key(1)

    # -- the loop's jit: explicit shardings, state donated ------------------------------------
    replicated = sharding.replicated(mesh)
    step = jax.jit(adapter.step,
                   in_shardings=(state_shardings, jax.tree.map(lambda x: x.sharding, data),
                                 replicated, jax.tree.map(lambda x: x.sharding, frozen)),
                   out_shardings=(state_shardings, replicated), donate_argnums=0,
                   compiler_options=xla_cpu.step_compiler_options(config.model.remat))
    with sharding.mesh_context(mesh):
        compiled, compile_s = common.compile_timed(step, state, data, rng, frozen)
    return dict(config=config, adapter=adapter, batch=batch, compiled=compiled,
                compile_s=compile_s, state=state, data=data, rng=rng, frozen=frozen)


def run(model: str = "lightningdit", variant: str = "B/1", batch: int | None = None,
        dtype: str = "float32", steps: int = 5, warmup: int = 2, peak: bool = True,
        peak_matmul_n: int = 2048, remat: bool = False, attention: str = "") -> dict:
    """Build, compile and time the step; returns the result dict (see the module docstring).
    `peak=False` skips the peak measurement (mfu then is None); on CPU the peak is the best
    (peak_matmul_n)^3 matmul in `dtype`, measured before and after the timed steps. `remat`
    checkpoints each block (config.model.remat); `attention` picks its attention
    (config.model.attention_impl: '', 'explicit', 'xla' or 'cudnn')."""
    built = compiled_step(model, variant, batch, dtype, remat, attention)
    config, adapter, batch = built["config"], built["adapter"], built["batch"]
    compiled, compile_s = built["compiled"], built["compile_s"]
    data, rng, frozen = built["data"], built["rng"], built["frozen"]
    state = built.pop("state")
    flops_per_image, flops_method = explicit_flops_per_image(model, adapter, state)
    xla_flops = common.cost_flops(compiled)

    holder = [state]
    del state

    def one_step():
        holder[0], metrics = compiled(holder[0], data, rng, frozen)
        return metrics["loss"]

    # CPU peak: measured before and after the timed steps, the better one kept (a neighbour's
    # burst during the ~0.5 s measurement would otherwise inflate the MFU)
    peaks = [common.device_peak(matmul_n=peak_matmul_n, dtype=dtype)] if peak else []
    timing = common.time_calls(one_step, steps=steps, warmup=warmup)
    if peak:
        peaks.append(common.device_peak(matmul_n=peak_matmul_n, dtype=dtype))
    mem = common.memory(compiled)
    images_per_s = batch / timing["median_s"]
    tflops = images_per_s * flops_per_image / 1e12
    result = {
        "bench": "train_step", "model": model,
        "variant": config.model.variant if model == "lightningdit" else config.variant,
        "batch": batch, "dtype": dtype, "remat": remat,
        "attention": ((config.model.attention_impl or "default") if model == "lightningdit"
                      else None), "steps": steps, "warmup": warmup,
        "images_per_s": images_per_s, "step_s": timing["median_s"],
        "step_mean_s": timing["mean_s"], "step_min_s": timing["min_s"],
        "step_max_s": timing["max_s"],
        "tflops_per_s": tflops, "flops_per_image": flops_per_image,
        "flops_method": flops_method,
        "xla_flops_per_image": xla_flops / batch if math.isfinite(xla_flops) else None,
        "flops_vs_xla": (flops_per_image / (xla_flops / batch)
                         if math.isfinite(xla_flops) and xla_flops > 0 else None),
        "compile_s": compile_s, **mem, **common.device_info(),
    }
    result["peak_tflops"], result["peak_source"], result["mfu"] = None, None, None
    if peak:
        result["peak_tflops"], result["peak_source"] = max(peaks)
        result["peak_tflops_each"] = [p for p, _ in peaks]
        result["mfu"] = tflops / result["peak_tflops"]
    holder.clear()
    return result


def report(r: dict) -> None:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    print(f"{r['model']} {r['variant']} batch {r['batch']} {r['dtype']} on {r['device']}: "
          f"{r['images_per_s']:.3f} img/s ({common.fmt_s(r['step_s'])}/step, "
          f"mean {common.fmt_s(r['step_mean_s'])}, min {common.fmt_s(r['step_min_s'])}), "
          f"compile {r['compile_s']:.1f} s")
    xla = (f"XLA {r['xla_flops_per_image'] / 1e9:.2f} G (ratio {r['flops_vs_xla']:.3f})"
           if r["flops_vs_xla"] else "no XLA cost analysis")
    print(f"  FLOPs/image {r['flops_per_image'] / 1e9:.2f} G ({r['flops_method']}), {xla}")
    if r["peak_tflops"]:
        print(f"  {r['tflops_per_s']:.3f} TFLOP/s = MFU {mfu} of {r['peak_tflops']:.3f} "
              f"TFLOP/s ({r['peak_source']})")
    print(f"  peak memory {r.get('peak_memory_gb', float('nan')):.2f} GB "
          f"({r.get('peak_memory_source', 'n/a')})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lightningdit", choices=["lightningdit", "vavae"])
    parser.add_argument("--variant", default=None,
                        help="lightningdit: B/1, XL/1, LightningDiT-L/2, ..., tiny or demo "
                             "(default B/1); vavae: f16d32 (configs/vavae.py:long_stage3), any "
                             "configs/vavae.py variant, or tiny")
    parser.add_argument("--batch", type=common.positive_int, default=None,
                        help="per step (default: lightningdit 8, vavae 1)")
    parser.add_argument("--peak_matmul_n", type=common.positive_int, default=2048,
                        help="CPU: size of the matmul (in --dtype) whose best speed is the peak")
    parser.add_argument("--remat", action="store_true",
                        help="rematerialise each block in the backward (config.model.remat: "
                             "LightningDiT's blocks, the VA-VAE's ResNet blocks)")
    common.attention_arg(parser)
    common.common_args(parser)
    args = parser.parse_args(argv)
    common.start(args)
    variant = args.variant or ("B/1" if args.model == "lightningdit" else "f16d32")
    r = run(args.model, variant, args.batch, args.dtype, args.steps, args.warmup,
            peak_matmul_n=args.peak_matmul_n, remat=args.remat, attention=args.attention)
    report(r)
    common.emit(r)


if __name__ == "__main__":
    main()
