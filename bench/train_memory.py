"""Expected memory per device of one training step, from XLA's compiled memory analysis.

    python -m bench.train_memory                            # both models, upstream batches
    python -m bench.train_memory --model lightningdit --per_device_batch 32 --json mem.json
    python -m bench.train_memory --model lightningdit --dit_depths 2,4   # extrapolate per block

LightningDiT-XL/1 (configs/lightningdit.py:xl1_64ep, 16x16x32 latents; upstream 1024 over 32
GPUs = 32 per device) and the VA-VAE (configs/vavae.py:long_stage3, 256x256 images, frozen
DINOv2-L and LPIPS; upstream 256 over 32 GPUs = 8 per device), each as float32, bfloat16
compute and bfloat16 + remat. The step is the one the training loop jits
(`launch.training.adapters`), state donated, lowered on abstract inputs: nothing is allocated.

Per variant: XLA's argument / output / temp / alias bytes and the peak estimate
arguments + temps + outputs - aliases. Per model: the exact state by part (from the abstract
tree) on one device and per device under FSDP over 8 (the logical shardings on an abstract
8-device mesh). XLA on CPU chooses its own fusion, layouts and buffer reuse (and may compute
bfloat16 in float32): the numbers estimate what the program needs on an accelerator.

So the program is the accelerators' one (`dit_jax.ops.accelerator_paths`: none of the CPU
paths), compiled as an accelerator's XLA would treat its memory: rematerialisation's barriers
kept (`launch.xla_cpu.REMAT_COMPILER_OPTIONS`; XLA:CPU otherwise merges the recomputation
back into the forward) and the smaller peak of XLA:CPU's two schedulers (`SCHEDULERS`): the
memory-optimised one kept every block's bias-gradient activations alive until the optimiser
(XL/1, bf16 + remat: 30.2 GiB), the concurrency-optimised one gives remat its due (12.7 GiB)
but holds more without remat (bf16: 42.5 against 33.3 GiB).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import AbstractMesh

from configs import lightningdit as dit_configs
from configs import vavae as vavae_configs
from dit_jax.ops import accelerator_paths
from launch import sharding
from launch.training.adapters import make_adapter
from launch.xla_cpu import REMAT_COMPILER_OPTIONS

GiB = float(2**30)
VARIANTS = {"float32": dict(dtype="float32", remat=False),
            "bfloat16": dict(dtype="bfloat16", remat=False),
            "bfloat16+remat": dict(dtype="bfloat16", remat=True)}
# model -> (config module, variant, upstream per-device batch)
MODELS = {"lightningdit": (dit_configs, "xl1_64ep", 32), "vavae": (vavae_configs, "long_stage3", 8)}
FIELDS = ("argument", "output", "temp", "alias", "peak")
SCHEDULERS = ("CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED", "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED")


def leaf_bytes(x) -> int:
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def tree_bytes(tree) -> int:
    return sum(leaf_bytes(x) for x in jax.tree.leaves(tree))


def build(model: str, variant: str, depth: int | None = None):
    """The training adapter of `model` as `variant`, and its boxed abstract state."""
    module, name, _ = MODELS[model]
    config = module.get_config(name)
    config.model.update(VARIANTS[variant])
    if depth is not None:
        config.model.depth = depth
    adapter = make_adapter(config)
    return adapter, jax.eval_shape(adapter.init_state, jax.random.key(0))


def abstract_inputs(model: str, adapter, batch: int):
    """(batch, frozen) as the loop feeds them: latents + labels, or uint8 images + the frozen
    DINOv2 / LPIPS parameters (built as launch/training/frozen.py does, but abstract)."""
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    if model == "lightningdit":
        m = adapter.model
        shape = (batch, m.input_size, m.input_size, m.in_channels)
        return {"latents": jax.ShapeDtypeStruct(shape, jnp.float32), "labels": labels}, {}
    s, models, rng = adapter.image_size, adapter.models, jax.random.key(0)
    images = {"image": jax.ShapeDtypeStruct((batch, s, s, 3), jnp.uint8), "labels": labels}
    frozen = {"foundation": None, "lpips": None}
    if models.foundation is not None:
        x = jax.ShapeDtypeStruct((1, 28, 28, 3), jnp.float32)
        frozen["foundation"] = nn.meta.unbox(
            jax.eval_shape(models.foundation.init, rng, x)["params"])
    if models.lpips is not None:
        x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
        frozen["lpips"] = nn.meta.unbox(jax.eval_shape(models.lpips.init, rng, x, x)["params"])
    return images, frozen


def state_parts(boxed, fsdp: int) -> dict:
    """Bytes of each state field on one device and per device with the parameters (and the
    optimiser / EMA trees that share their boxes) sharded FSDP-style over `fsdp` devices."""
    mesh = AbstractMesh((1, fsdp, 1), sharding.MESH_AXES)
    shardings = sharding.logical_shardings(boxed, mesh)
    state = nn.meta.unbox(boxed)
    per_device = jax.tree.map(lambda sh, x: int(np.prod(sh.shard_shape(x.shape)))
                              * np.dtype(x.dtype).itemsize, shardings, state)
    parts = {f.name: {"bytes": tree_bytes(getattr(state, f.name)),
                      "fsdp_bytes": sum(jax.tree.leaves(getattr(per_device, f.name)))}
             for f in dataclasses.fields(state)}
    parts["total"] = {k: sum(p[k] for p in parts.values()) for k in ("bytes", "fsdp_bytes")}
    parts["total"]["params"] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    return parts


def compile_step(adapter, state, batch, frozen) -> dict:
    """XLA's memory analysis of the jitted, donating step traced for an accelerator (on a CPU
    under each of `SCHEDULERS`: the smaller peak, its scheduler and each one's peak); plus
    compile time and the process's peak RSS so far (compiling XL/1 on a small machine is
    itself the risk)."""
    rng = jax.eval_shape(jax.random.key, 0)
    start = time.perf_counter()
    with accelerator_paths():
        lowered = jax.jit(adapter.step, donate_argnums=0).lower(state, batch, rng, frozen)
    on_cpu = jax.default_backend() == "cpu"
    schedulers = SCHEDULERS if on_cpu else ("default",)  # an accelerator: its own XLA
    runs = {}
    for scheduler in schedulers:
        options = (dict(REMAT_COMPILER_OPTIONS, xla_cpu_scheduler_type=scheduler)
                   if on_cpu else None)
        stats = lowered.compile(compiler_options=options).memory_analysis()
        run = {f: int(getattr(stats, f"{f}_size_in_bytes")) for f in FIELDS[:-1]}
        run["peak"] = run["argument"] + run["temp"] + run["output"] - run["alias"]
        run["xla_peak"] = int(getattr(stats, "peak_memory_in_bytes", 0))
        runs[scheduler] = run
        jax.clear_caches()  # drop the executable before the next, larger one
    scheduler = min(schedulers, key=lambda name: runs[name]["peak"])
    out = dict(runs[scheduler])
    out["scheduler"] = scheduler
    out["peak_by_scheduler"] = {name: runs[name]["peak"] for name in schedulers}
    out["compile_s"] = time.perf_counter() - start
    out["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    return out


def extrapolate(runs: dict[int, dict], depth: int) -> dict:
    """Every byte count linear in depth through the two compiled depths (state, gradients and
    saved activations all grow by one block's worth per block)."""
    (da, a), (db, b) = sorted(runs.items())
    out = {k: round(a[k] + (depth - da) * (b[k] - a[k]) / (db - da))
           for k in (*FIELDS, "xla_peak")}
    out["temp_per_block"] = (b["temp"] - a["temp"]) / (db - da)
    out["scheduler"] = b["scheduler"]  # the deeper program's (the closer to the full one)
    out["compile_s"] = a["compile_s"] + b["compile_s"]
    out["max_rss_gib"] = max(a["max_rss_gib"], b["max_rss_gib"])
    out["extrapolated_from_depths"] = sorted(runs)
    return out


def run_model(model: str, batch: int, fsdp: int, dit_depths: list[int]) -> dict:
    result = {"config": f"configs/{model}.py:{MODELS[model][1]}", "per_device_batch": batch,
              "variants": {}}
    for variant in VARIANTS:
        adapter, boxed = build(model, variant)
        batch_abs, frozen = abstract_inputs(model, adapter, batch)
        if "state" not in result:  # parameters stay float32 in every variant
            result["state"] = state_parts(boxed, fsdp)
            result["frozen_bytes"] = tree_bytes(frozen)
            result["batch_bytes"] = tree_bytes(batch_abs)
            result["depth"] = adapter.model.depth if model == "lightningdit" else None
        try:
            if model == "lightningdit" and dit_depths:
                runs = {}
                for d in dit_depths:
                    small, small_boxed = build(model, variant, depth=d)
                    runs[d] = compile_step(small, nn.meta.unbox(small_boxed), batch_abs, frozen)
                r = extrapolate(runs, adapter.model.depth)
                r["state_check"] = r["output"] - result["state"]["total"]["bytes"]
            else:
                r = compile_step(adapter, nn.meta.unbox(boxed), batch_abs, frozen)
        except Exception as e:  # one variant failing to trace must not hide the others
            result["variants"][variant] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
            print(f"  [{model} {variant}] FAILED: {result['variants'][variant]['error']}")
            continue
        result["variants"][variant] = r
        print(f"  [{model} {variant}] compiled in {r['compile_s']:.0f} s, "
              f"max RSS {r['max_rss_gib']:.1f} GiB", flush=True)
    return result


def gib(n: float) -> str:
    return f"{n / GiB:8.2f}"


def print_model(model: str, r: dict, fsdp: int) -> None:
    title = {"lightningdit": "LightningDiT-XL/1", "vavae": "VA-VAE f16d32"}[model]
    print(f"\n{title} ({r['config']}), per-device batch {r['per_device_batch']}")
    print(f"  state{'':16s}1 device  FSDP-{fsdp}/dev   (GiB)")
    for part, p in r["state"].items():
        print(f"  {part:18s}{gib(p['bytes'])}  {gib(p['fsdp_bytes'])}")
    print(f"  ({r['state']['total']['params'] / 1e6:.1f} M trained parameters; frozen tree "
          f"{r['frozen_bytes'] / GiB:.2f} GiB, batch {r['batch_bytes'] / GiB:.3f} GiB)")
    print(f"  {'variant':16s}{'args':>8s}  {'outputs':>8s}  {'temps':>8s}  {'aliases':>8s}"
          f"  {'peak':>8s}   compile   scheduler")
    for name, v in r["variants"].items():
        if "error" in v:
            print(f"  {name:16s}failed: {v['error'][:150]}")
            continue
        cells = "  ".join(gib(v[f]) for f in FIELDS)
        scheduler = v["scheduler"].removeprefix("CPU_SCHEDULER_TYPE_").lower()
        print(f"  {name:16s}{cells}   {v['compile_s']:5.0f} s   {scheduler}")
    for name, v in r["variants"].items():
        if "extrapolated_from_depths" in v:
            print(f"  {name}: extrapolated linearly from depths {v['extrapolated_from_depths']} "
                  f"to {r['depth']}: temps {v['temp_per_block'] / GiB:.3f} GiB per block "
                  f"(outputs - exact state = {v['state_check'] / GiB:+.3f} GiB)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="both", choices=["lightningdit", "vavae", "both"])
    parser.add_argument("--per_device_batch", type=int, default=0,
                        help="0: upstream's (LightningDiT 32, VA-VAE 8)")
    parser.add_argument("--fsdp", type=int, default=8, help="devices for the FSDP state column")
    parser.add_argument("--dit_depths", default="",
                        help="e.g. '2,4': compile LightningDiT at these depths and extrapolate "
                             "(for machines where compiling all 28 blocks is too slow)")
    parser.add_argument("--json", default="", help="write the numbers here")
    args = parser.parse_args(argv)

    depths = [int(d) for d in args.dit_depths.split(",") if d]
    if depths and len(depths) != 2:
        parser.error("--dit_depths takes two depths")
    models = list(MODELS) if args.model == "both" else [args.model]
    results = {}
    for model in models:
        batch = args.per_device_batch or MODELS[model][2]
        results[model] = run_model(model, batch, args.fsdp, depths)
    platform = jax.devices()[0].platform
    print(f"\nMemory per device of one training step (XLA {platform} memory_analysis; "
          "GiB = 2^30 bytes)\npeak = args + temps + outputs - aliases (the donated state is "
          "aliased to the new one);\ntemps hold gradients, optimiser updates and saved "
          "activations.")
    if platform == "cpu":
        print("Estimates: XLA on CPU fuses, lays out and reuses buffers differently from "
              "GPU/TPU XLA\nand may keep bfloat16 work in float32.")
    for model, r in results.items():
        print_model(model, r, args.fsdp)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"platform": platform, "fsdp": args.fsdp,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
