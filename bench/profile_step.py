"""Where a training step's wall time goes on CPU, per kind of XLA op (a `jax.profiler` trace).

    python -m bench.profile_step --model lightningdit --variant B/1 --batch 8
    python -m bench.profile_step --model vavae --variant f16d32 --steps 1 --top 20
    python -m bench.profile_step --what guided --variant B/1 --batch 8 --steps 3

Compiles `bench.train_step`'s step (the loop's jitted step on one device), or with `--what
guided` `bench.sample`'s guided LightningDiT call (batch / 2 conditional + batch / 2
unconditional rows, as upstream's inference), runs it `--warmup` times (at least once)
untraced, then `--steps` times under `jax.profiler`, and reads back the trace. XLA:CPU names
each event after the HLO instruction it runs (a fusion, a dot, a copy), so each event is
classified by what that instruction computes in the compiled HLO: `dot` (per layer name and
operand shapes, with its FLOP rate), `convolution`, `transpose` (layout changes), `reduce`,
`elementwise`, `copy`, `other`.

XLA runs independent ops side by side, so summed op durations overstate the step. Here every
stretch of the timeline is shared out equally among the ops running in it, and the shares
add up to the step's wall time less `idle_s`, the time with no traced op running (host
gaps).

XLA:CPU starts its own (Eigen) matmuls and convolutions asynchronously: the event ends when
the work is handed to other threads, and the ops traced next run beside it. In the B/1
float32 step the w3 weight gradient's events took 1.2-1.8 ms for 6.4 GFLOP, and the w3 input
gradient traced next 46-48 ms, twice its time alone; in the f16d32 VA-VAE step, whose
convolutions `launch.xla_cpu`'s flag gives to Eigen, 3.5 s of a 10.7 s step had no op
running. A dot or convolution event too short for its FLOPs at 1.5x the matmul peak
(measured here as by `bench.train_step`) is therefore taken to last until its completion
mark ("end: NAME") or the first start of an op that reads its result, whichever comes
first: an upper bound, shared with whatever else ran then.

Prints a table and, as its last line, one JSON object: `what`, `wall_s` per step (or call),
`idle_s`, `attributed_s` per kind, `dots` (the top `--top` layer / shape groups: `wall_s`,
`tflops_per_s` over that share, `count`, `busy_s` the summed spans of its ops, `overlapped`
= 1 - wall_s / busy_s, the part of them shared with other ops, and `async`, how many of its
ops per step were taken to run past their events), `ops` (the top `--top_ops` groups of the
other ops, by kind, result shape and where in the model they come from: `wall_s`, `count`,
`tflops_per_s` for convolutions), `dot_flops` and `peak_tflops`. An op's "where" is its
op_name in the HLO metadata with the layer indices starred (`blocks_*`), `forward` /
`backward` for the model's passes and the bare operation (`add`, `mul`) for the optimizer
update outside them.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import glob
import gzip
import json
import math
import os
import re
import tempfile

import jax

from bench import common
from bench.sample import guided_call
from bench.train_step import compiled_step

# First match wins: a fusion holding a dot is a dot, even with elementwise work around it.
KINDS = ("convolution", "dot", "reduce-window", "reduce", "transpose")
CONTROL_FLOW = ("while", "conditional", "call")  # their events enclose the ops they run
# A dot or convolution whose event is shorter than its FLOPs take at this multiple of the
# measured matmul peak only started its work (`spans`)
DISPATCH_ONLY_RATE = 1.5

# a computation's header is "name (params) -> type {"; the module's first line is not
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*?\{\n(.*?)\n\}", re.S | re.M)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+\[[\d,]*\])\S* ([\w\-]+)\((.*)$")
# ops that run no thunk of their own: a reader through them reads the op behind them
PASS_THROUGH = ("bitcast", "get-tuple-element", "tuple")
# any result shape, tuples too: name, op, operands and attributes
_ANY_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\((.*)$")


def _where(line: str) -> str:
    """Where an instruction comes from, from its op_name: "backward blocks_*/attn/stack"."""
    op_name = re.search(r'op_name="([^"]*)"', line)
    if not op_name:
        return "?"
    passes, parts = [], []
    for part in op_name.group(1).split(";")[0].split("/"):
        if part.startswith("transpose(jvp("):
            passes.append("backward")
        elif part.startswith("jvp("):
            passes.append("forward")
        elif not part.startswith("jit("):
            parts.append(re.sub(r"_\d+$", "_*", part))
    return " ".join(passes[-1:] + ["/".join(parts) or "?"])


def _dims(shape: str) -> list[int]:
    return [int(d) for d in shape[shape.index("[") + 1:-1].split(",") if d]


def _dot_info(line: str, shapes: dict) -> tuple[str, float]:
    """(label, FLOPs) of one HLO dot line; shapes maps operand names to their shapes."""
    m = _INSTRUCTION.match(line)
    out, rest = m.group(2), m.group(4)
    lhs_name, rhs_name = (a.strip().lstrip("%") for a in rest.split(")", 1)[0].split(","))
    lhs, rhs = shapes.get(lhs_name, "?[]"), shapes.get(rhs_name, "?[]")
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    k = 0  # no FLOPs where the operand's shape is unknown
    if contracting and lhs_name in shapes:
        lhs_dims = _dims(lhs)
        k = math.prod(lhs_dims[int(d)] for d in contracting.group(1).split(",") if d)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    parts = [p for p in op_name.group(1).split("/") if p != "dot_general"] if op_name else []
    layer = parts[-1] if parts else "?"
    label = f"{layer} {lhs[lhs.index('['):]} x {rhs[rhs.index('['):]}"
    return label, 2.0 * math.prod(_dims(out)) * k


def _conv_flops(line: str, shapes: dict) -> float:
    """FLOPs of one HLO convolution line, as executed (2 per multiply-add, the zeros of a
    dilated input included): each output element takes the kernel's window x input
    features; 0 where the kernel's shape is unknown."""
    m = _INSTRUCTION.match(line)
    operands = [a.strip().lstrip("%") for a in m.group(4).split(")", 1)[0].split(",")]
    labels = re.search(r"dim_labels=\w+_(\w+)->", line)
    if len(operands) != 2 or operands[1] not in shapes or not labels:
        return 0.0
    kernel = _dims(shapes[operands[1]])
    per_output = math.prod(n for n, axis in zip(kernel, labels.group(1)) if axis != "o")
    return 2.0 * math.prod(_dims(m.group(2))) * per_output


def classify_hlo(hlo_text: str) -> dict:
    """Instruction name -> (kind, label, FLOPs) for every instruction of the compiled
    module's computations (fusion bodies included). A dot's label is its layer and operand
    shapes, any other op's its result shape and `_where`."""
    bodies = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo_text)}
    parsed = {}  # computation -> [(name, shape, op, line)]
    for comp, body in bodies.items():
        parsed[comp] = [(m.group(1), m.group(2), m.group(3), line)
                        for line in body.splitlines() if (m := _INSTRUCTION.match(line))]
    table = {}
    for instructions in parsed.values():
        shapes = {name: shape for name, shape, _, _ in instructions}
        for name, shape, op, line in instructions:
            label = f"{shape} {_where(line)}"
            if op == "fusion":
                called = re.search(r"calls=%?([\w.\-]+)", line)
                inner = parsed.get(called.group(1), []) if called else []
                inner_ops = {o for _, _, o, _ in inner}
                kind = next((k for k in KINDS if k in inner_ops), "elementwise")
                inner_shapes = {n: s for n, s, _, _ in inner}
                if kind == "dot":
                    dot_line = next(ln for _, _, o, ln in inner if o == "dot")
                    table[name] = ("dot", *_dot_info(dot_line, inner_shapes))
                elif kind == "convolution":
                    conv_line = next(ln for _, _, o, ln in inner if o == "convolution")
                    table[name] = (kind, label, _conv_flops(conv_line, inner_shapes))
                else:
                    table[name] = (kind, label, 0.0)
            elif op == "dot":
                table[name] = ("dot", *_dot_info(line, shapes))
            elif op == "convolution":
                table[name] = (op, label, _conv_flops(line, shapes))
            elif op in ("copy", "transpose"):
                table[name] = (op, label, 0.0)
            elif op not in ("parameter", "constant", *PASS_THROUGH):
                table[name] = ("other", label, 0.0)
    return table


def readers(hlo_text: str) -> dict[str, set[str]]:
    """Instruction name -> the instructions that read its result, looking through
    `PASS_THROUGH` ops (names are unique across an HLO module)."""
    ops, direct = {}, collections.defaultdict(set)
    for comp in _COMPUTATION.finditer(hlo_text):
        for line in comp.group(2).splitlines():
            if m := _ANY_INSTRUCTION.match(line):
                ops[m.group(1)] = m.group(2)
                for operand in re.findall(r"%([\w.\-]+)", m.group(3).split(")", 1)[0]):
                    direct[operand].add(m.group(1))
    resolved = {}

    def through(name: str) -> set[str]:
        if name not in resolved:
            resolved[name] = set()  # a cycle (none in HLO) ends here
            found = set()
            for reader in direct.get(name, ()):
                found |= through(reader) if ops.get(reader) in PASS_THROUGH else {reader}
            resolved[name] = found
        return resolved[name]

    return {name: through(name) for name in ops}


def spans(raw: list[dict], reader_map: dict[str, set[str]],
          dispatch_only) -> list[tuple[float, float, str, bool]]:
    """(start, end, name, extended) in seconds for each traced op (trace events in
    microseconds). An event for which `dispatch_only(event)` holds ended when its work was
    handed to other threads; its span ends instead at the earlier of its completion mark
    ("end: NAME") and the first start of an op reading its result. (Only there: a mark comes
    after whatever else its thread ran next, readers or not.)"""
    starts, marks = collections.defaultdict(list), collections.defaultdict(list)
    for e in raw:
        if e["name"].startswith("end: "):
            marks[e["name"][5:]].append(e["ts"])
        else:
            starts[e["name"]].append(e["ts"])
    for times in (*starts.values(), *marks.values()):
        times.sort()
    out = []
    for e in raw:
        name, start, end = e["name"], e["ts"], e["ts"] + e["dur"]
        if name.startswith("end: "):
            continue
        extended = dispatch_only(e)
        if extended:
            bounds = []
            mark = marks.get(name, [])
            if (i := bisect.bisect_left(mark, start)) < len(mark):
                bounds.append(mark[i])
            for reader in reader_map.get(name, ()):
                later = starts.get(reader, [])
                if (i := bisect.bisect_right(later, start)) < len(later):
                    bounds.append(later[i])
            end = max(end, min(bounds, default=end))
        out.append((start / 1e6, end / 1e6, name, extended))
    return out


def attribute(events: list[tuple[float, float, str]]) -> tuple[collections.Counter, float]:
    """Share every stretch of the timeline equally among the events running in it.

    events: (start, end, key). Returns (seconds per key, idle seconds between the first
    start and the last end)."""
    marks = sorted([(s, 1, i) for i, (s, _, _) in enumerate(events)]
                   + [(e, -1, i) for i, (_, e, _) in enumerate(events)])
    shares, idle, active, last = collections.Counter(), 0.0, set(), None
    for t, change, i in marks:
        if last is not None:
            if active:
                for j in active:
                    shares[events[j][2]] += (t - last) / len(active)
            else:
                idle += t - last
        last = t
        (active.add if change > 0 else active.discard)(i)
    return shares, idle


def trace_events(trace_dir: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not files:
        raise SystemExit(f"no *.trace.json.gz under {trace_dir}: the profiler wrote no trace")
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def _compiled_call(what: str, model: str, variant: str, batch: int | None, dtype: str):
    """(compiled, run_once, batch): the jitted program to profile and a function that calls
    it once and waits for it. `what`: "train" for the loop's training step, "guided" for one
    guided LightningDiT velocity call (`bench.sample`: batch / 2 conditional and batch / 2
    unconditional rows at t = 0.5)."""
    if what == "train":
        built = compiled_step(model, variant, batch, dtype)
        compiled, data, rng, frozen = (built[k] for k in ("compiled", "data", "rng", "frozen"))
        state = [built.pop("state")]  # donated each step: keep the newest

        def run_once():
            state[0], metrics = compiled(state[0], data, rng, frozen)
            jax.block_until_ready(metrics)

        return compiled, run_once, built["batch"]
    if what != "guided":
        raise SystemExit(f"--what {what!r}: train or guided")
    if model != "lightningdit":
        raise SystemExit("--what guided: a LightningDiT call (--model lightningdit)")
    batch = 8 if batch is None else batch
    built = guided_call(variant, batch, dtype)
    call, inputs = built["call"], [built[k] for k in ("params", "noise", "labels", "t")]
    return call, lambda: jax.block_until_ready(call(*inputs)), batch


def profile(model: str = "lightningdit", variant: str = "B/1", batch: int | None = None,
            dtype: str = "float32", steps: int = 1, warmup: int = 1, top: int = 15,
            trace_dir: str | None = None, top_ops: int = 15, what: str = "train") -> dict:
    compiled, run_once, batch = _compiled_call(what, model, variant, batch, dtype)
    hlo_text = compiled.as_text()
    table, reader_map = classify_hlo(hlo_text), readers(hlo_text)
    for _ in range(max(warmup, 1)):  # untraced: first-call costs
        run_once()
    with tempfile.TemporaryDirectory() as tmp:
        trace_dir = trace_dir or tmp
        jax.profiler.start_trace(trace_dir)
        for _ in range(steps):
            run_once()
        jax.profiler.stop_trace()
        raw = trace_events(trace_dir)
    del run_once

    ops = []  # (start s, end s, (kind, label))
    # per group, over all steps: FLOPs, ops, their summed spans, and the ops that ran past
    # their events (asynchronous)
    flops, counts, busy = collections.Counter(), collections.Counter(), collections.Counter()
    ran_past = collections.Counter()
    peak, peak_source = common.device_peak(dtype=dtype)

    def dispatch_only(event):  # too short for its FLOPs
        entry = table.get(event["name"])
        return bool(entry and entry[2] > DISPATCH_ONLY_RATE * peak * event["dur"] * 1e6)

    for start, end, name, asynchronous in spans(raw, reader_map, dispatch_only):
        entry = table.get(name)
        if entry is None or name.split(".")[0] in CONTROL_FLOW:
            continue
        kind, label, f = entry
        ops.append((start, end, (kind, label)))
        flops[kind, label] += f
        counts[kind, label] += 1
        busy[kind, label] += end - start
        ran_past[kind, label] += asynchronous
    if not ops:
        raise SystemExit("no trace event matched an HLO instruction of the step (this reads "
                         "XLA:CPU traces, whose events carry the instruction names)")
    shares, idle = attribute(ops)
    wall = (max(e for _, e, _ in ops) - min(s for s, _, _ in ops)) / steps
    kinds = collections.Counter()
    for (kind, _), seconds in shares.items():
        kinds[kind] += seconds / steps
    groups = shares.most_common()
    dots = [{"label": label, "wall_s": seconds / steps, "count": counts[kind, label] // steps,
             "tflops_per_s": flops[kind, label] / seconds / 1e12 if seconds else None,
             "busy_s": busy[kind, label] / steps,
             "overlapped": 1 - seconds / busy[kind, label] if busy[kind, label] else 0.0,
             "async": ran_past[kind, label] // steps}
            for (kind, label), seconds in groups if kind == "dot"][:top]
    others = [{"kind": kind, "label": label, "wall_s": seconds / steps,
               "count": counts[kind, label] // steps,
               "tflops_per_s": (flops[kind, label] / seconds / 1e12
                                if seconds and flops[kind, label] else None)}
              for (kind, label), seconds in groups if kind != "dot"][:top_ops]
    return {"bench": "profile_step", "model": model, "what": what,
            "variant": variant, "batch": batch, "dtype": dtype, "steps": steps,
            "wall_s": wall, "idle_s": idle / steps,
            "attributed_s": dict(kinds.most_common()), "dots": dots, "ops": others,
            "peak_tflops": peak, "peak_source": peak_source,
            "dot_flops": sum(f for (kind, _), f in flops.items() if kind == "dot") / steps,
            **common.device_info()}


def report(r: dict) -> None:
    unit, program = ("step", "step") if r["what"] == "train" else ("call", "guided call")
    print(f"{r['model']} {r['variant']} batch {r['batch']} {r['dtype']} on {r['device']}: "
          f"{r['wall_s']:.3f} s per {program}, {r['idle_s']:.3f} s with no traced op running "
          f"(host gaps)")
    for kind, seconds in r["attributed_s"].items():
        print(f"  {kind:14s} {seconds:8.3f} s  {100 * seconds / r['wall_s']:5.1f}%")
    print(f"  dots (layer, operand shapes): wall share, TFLOP/s over it, per {unit} (and the part "
          "of their time\n  shared with other ops, which then ran beside them)")
    for d in r["dots"]:
        rate = f"{d['tflops_per_s']:.3f}" if d["tflops_per_s"] is not None else "n/a"
        notes = [f"{100 * d['overlapped']:.0f}% shared"] if d["overlapped"] >= 0.05 else []
        if d["async"]:
            notes.append(f"{d['async']} asynchronous")
        notes = "  (" + ", ".join(notes) + ")" if notes else ""
        print(f"    {d['wall_s']:8.3f} s {rate:>7s} TFLOP/s {d['count']:4d}x  {d['label']}{notes}")
    print(f"  other ops (kind, result shape, where): wall share per {unit}")
    for o in r["ops"]:
        rate = f"  ({o['tflops_per_s']:.3f} TFLOP/s)" if o["tflops_per_s"] else ""
        print(f"    {o['wall_s']:8.3f} s {o['count']:4d}x  {o['kind']:11s} {o['label']}{rate}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lightningdit", choices=["lightningdit", "vavae"])
    parser.add_argument("--variant", default=None, help="as bench.train_step (default B/1 / "
                        "f16d32)")
    parser.add_argument("--batch", type=int, default=None, help="as bench.train_step (and 8 "
                        "for --what guided)")
    parser.add_argument("--what", default="train", choices=["train", "guided"],
                        help="the training step, or one guided LightningDiT call as "
                        "bench.sample times it")
    parser.add_argument("--top", type=int, default=15, help="dot groups listed")
    parser.add_argument("--top_ops", type=int, default=15, help="groups of other ops listed")
    parser.add_argument("--trace_dir", default=None,
                        help="keep the trace here (default: a temporary directory)")
    common.common_args(parser, steps=1, warmup=1)
    args = parser.parse_args(argv)
    common.start(args)
    variant = args.variant or ("B/1" if args.model == "lightningdit" else "f16d32")
    r = profile(args.model, variant, args.batch, args.dtype, args.steps, args.warmup, args.top,
                args.trace_dir, args.top_ops, args.what)
    report(r)
    common.emit(r)


if __name__ == "__main__":
    main()
