"""Which collectives one LightningDiT training step runs on a data x fsdp x tensor mesh.

    python -m bench.collectives [--variant B/1 --batch 16 --devices 8]

Compiles the loop's jitted step (state donated, the runtime's logical sharding rules) on
simulated CPU devices for several mesh shapes and counts, in the compiled HLO, every
all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute with the bytes its
result holds per device. TPU / GPU users can predict scaling from it: with `fsdp`, parameters
are all-gathered for the forward and backward and gradients reduce-scattered; with `data`
only, gradients are all-reduced. It also checks that every mesh gives the one-device loss.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
               "f64": 8, "s64": 8, "u64": 8}
MESHES = ({"data": 2}, {"data": 4}, {"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 4},
          {"data": 2, "fsdp": 2, "tensor": 2})


def _shape_bytes(text: str) -> int:
    """Bytes of an HLO result type such as `f32[8,128]{1,0}` or a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
        if dtype in DTYPE_BYTES:
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            total += n * DTYPE_BYTES[dtype]
    return total


def count_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{op: {'count', 'bytes'}} of the collectives in compiled HLO text (async pairs once)."""
    found = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([a-z\-]+)\(", line)
        if not m:
            continue
        result_type, op = m.groups()
        base = op.removesuffix("-start")
        if base in COLLECTIVES and not op.endswith("-done"):
            if op.endswith("-start"):  # (operands..., result): count the result only
                result_type = re.findall(r"[a-z]+\d*\[[\d,]*\]", result_type)[-1]
            found[base]["count"] += 1
            found[base]["bytes"] += _shape_bytes(result_type)
    return dict(found)


def run(variant: str, batch: int, meshes=MESHES) -> list[dict]:
    import jax
    import numpy as np

    from bench.train_step import dit_config, make_batch
    from launch import sharding
    from launch.training.adapters import make_adapter

    config = dit_config(variant, "float32")
    adapter = make_adapter(config)
    data_np = make_batch("lightningdit", adapter, batch)
    rows = []
    for axes in ({}, *meshes):
        shape = {"data": 1, "fsdp": 1, "tensor": 1, **axes}
        n = shape["data"] * shape["fsdp"] * shape["tensor"]
        mesh = sharding.create_mesh(shape, jax.devices()[:n])
        state, shardings = sharding.sharded_init(adapter.init_state, jax.random.key(0),
                                                 mesh=mesh)
        data = jax.tree.map(
            lambda x, m=mesh: jax.device_put(x, sharding.batch_sharding(m, x.ndim)), data_np)
        replicated = sharding.replicated(mesh)
        step = jax.jit(adapter.step,
                       in_shardings=(shardings, jax.tree.map(lambda x: x.sharding, data),
                                     replicated, {}),
                       out_shardings=(shardings, replicated), donate_argnums=0)
        with sharding.mesh_context(mesh):
            compiled = step.lower(state, data, jax.random.key(1), {}).compile()
            _, metrics = compiled(state, data, jax.random.key(1), {})
        rows.append({"mesh": {k: v for k, v in shape.items() if v > 1} or {"one device": 1},
                     "loss": float(np.asarray(metrics["loss"])),
                     "collectives": count_collectives(compiled.as_text())})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="B/1")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    args = parser.parse_args(argv)
    if "jax" not in sys.modules:  # the simulated devices must exist before JAX starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
    rows = run(args.variant, args.batch)
    base = rows[0]["loss"]
    print(f"LightningDiT {args.variant}, global batch {args.batch}, float32; MiB per device")
    print(f"{'mesh':32} {'loss':>10}  " + "  ".join(f"{c:>23}" for c in COLLECTIVES))
    for row in rows:
        cells = []
        for c in COLLECTIVES:
            v = row["collectives"].get(c)
            mib = f"{v['count']:>6} x {v['bytes'] / 2**20:>10.2f} MiB" if v else None
            cells.append(mib or f"{'-':>23}")
        print(f"{json.dumps(row['mesh']):32} {row['loss']:>10.6f}  " + "  ".join(cells))
    worst = max(abs(r["loss"] - base) / abs(base) for r in rows)
    print(json.dumps({"bench": "collectives", "variant": args.variant, "batch": args.batch,
                      "max_rel_loss_diff": worst, "meshes": rows}))


if __name__ == "__main__":
    main()
