"""Side by side with the PyTorch original: upstream's CPU timings and ours, in one invocation.

    python -m bench.compare                  # train_b1, sample_b1, sample_run_b1, vae
    python -m bench.compare --what train_b1 --steps 5 --warmup 2
    python -m bench.compare --what train_b1,sample_b1 --dtype bfloat16

For each comparison, one after the other: upstream eager, upstream with its `@torch.compile`
decorators active (`--skip_compile` leaves it out), then ours in this process. Printed: a table
of seconds per call and of ratios upstream / ours (> 1: ours is faster), taken against the
faster upstream mode; the last line is one JSON object. Before and after, each side's matmul
library is timed on this CPU (XLA's here, torch's by `bench/torch_matmul.py` in the reference
environment), and each call's FLOP/s is given as a fraction of its own library's peak: on a CPU
where torch's matmuls are faster than XLA's, that tells the programs apart from the libraries.

  train_b1   LightningDiT-B/1 training step, batch 8, float32 (upstream: train.py's step,
             training_losses + backward + AdamW + update_ema, by `bench/upstream_torch.py
             --ema`; `--no-upstream_ema` times bench_cpu.py's step without the EMA; ours:
             `bench.train_step`, the loop's jitted step, which always updates the EMA)
  sample_b1  one guided model call, batch 8 = 4 conditional + 4 unconditional, t = 0.5, cfg 6.7
             with the interval on (`bench.sample` with --num_steps 0)
  sample_run_b1  a whole guided sample of 4 images as upstream's inference.py draws it: Euler
             over `--sample_steps` grid points (released: 250) with shift 0.3, cfg 6.7, interval
             from 0.125 (upstream: `Sampler.sample_ode` + `forward_with_cfg` by
             `bench/upstream_torch.py`, one timed sample after `--warmup` single calls; ours:
             `bench.sample`'s jitted `sample_latents`, which skips the unconditional half
             before the interval)
  vae        f16d32 at 256x256, batch 1: encode (posterior sample) + decode (`bench.vae`)

Upstream's float32 guided call and VA-VAE are `bench_cpu.py` of the shared upstream tools
(../shared/upstream), run with the reference environment's python on an export of
hustvl/LightningDiT. One-time setup:

    # 1. a bare clone of the upstream repository
    git clone --bare https://github.com/hustvl/LightningDiT /tmp/LightningDiT.git
    # 2. CPU torch + upstream's dependencies in /tmp/refenv, the work tree exported to
    #    /tmp/upstream
    bash ../shared/upstream/setup_refenv.sh /tmp/refenv torch==2.13.0 /tmp/LightningDiT.git \\
        /tmp/upstream

then `--refenv_python /tmp/refenv/bin/python --upstream_dir /tmp/upstream` (the defaults).
`--dtype bfloat16` runs our side in bfloat16 and upstream's train_b1 / sample_b1 under torch's
CPU bf16 autocast, as Accelerate trains it (`bench/upstream_torch.py`); the VA-VAE stays
float32 on both sides (upstream never runs it under autocast).
Ours runs with glibc's huge-page tunable where `launch.host_memory` applies it, as every entry
point (`--no-huge_pages`: without); `--upstream_huge_pages` gives upstream's processes the same
tunable (default: glibc's defaults, as a user runs upstream).
Torch runs with 2 threads, as XLA here: the machine is shared and noisy, so only the
ratios of measurements taken minutes apart mean anything; the 1-minute load average is
recorded before each measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

from bench import common
from launch import host_memory

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_BENCH_CPU = REPO.parent / "shared" / "upstream" / "bench_cpu.py"
UPSTREAM_TORCH_SCRIPT = REPO / "bench" / "upstream_torch.py"
TORCH_MATMUL_SCRIPT = REPO / "bench" / "torch_matmul.py"
WHATS = ("train_b1", "sample_b1", "sample_run_b1", "vae")
# the targets: upstream seconds / ours
TARGETS = {"train_b1": 1.5, "sample_b1": 2.0, "sample_run_b1": 2.0, "vae": 1.5}

SETUP_HELP = """\
The upstream side needs the reference environment and an export of hustvl/LightningDiT:
  missing: {missing}
Set them up once (see {readme}):
  1. get the upstream repository as a bare git directory, e.g.
       git clone --bare https://github.com/hustvl/LightningDiT /tmp/LightningDiT.git
  2. bash {setup} /tmp/refenv torch==2.13.0 /tmp/LightningDiT.git /tmp/upstream
then rerun with --refenv_python /tmp/refenv/bin/python --upstream_dir /tmp/upstream
(the defaults) and --bench_cpu pointing at upstream/bench_cpu.py of the shared tools."""


def load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def upstream_seconds(what: str, r: dict) -> dict:
    """{'total': s, parts...} of upstream's result (medians)."""
    if what == "vae":
        enc, dec = r["encode"]["median_s"], r["decode"]["median_s"]
        return {"total": enc + dec, "encode": enc, "decode": dec}
    return {"total": r["median_s"]}


def upstream_command(what: str, compiled: bool, args) -> list[str]:
    """The reference environment's command for one upstream measurement.

    train_b1 goes to `upstream_torch.py --ema` (train.py's step: loss + backward + AdamW +
    `update_ema`, as our step) unless `--no-upstream_ema`, which gives the shared tools'
    `bench_cpu.py` step without the EMA; any bfloat16 run goes to `upstream_torch.py` (autocast),
    and so does the whole sample (one timed sample of `--sample_steps` grid points).
    """
    dtype = dtype_of(what, args)
    ema = what == "train_b1" and args.upstream_ema
    if dtype == "bfloat16" or ema or what == "sample_run_b1":
        cmd = [args.refenv_python, str(UPSTREAM_TORCH_SCRIPT), "--what", what,
               "--dtype", dtype, "--shared", str(pathlib.Path(args.bench_cpu).parent),
               "--upstream_dir", str(args.upstream_dir)]
        if ema:
            cmd.append("--ema")
    else:
        cmd = [args.refenv_python, str(args.bench_cpu), "--what", what]
    repeats = args.steps
    if what == "sample_run_b1":
        cmd += ["--num_steps", str(args.sample_steps)]
        repeats = 1
    cmd += ["--warmup", str(args.warmup), "--repeats", str(repeats)]
    if what != "vae":
        cmd += ["--batch", "8"]
    if compiled:
        cmd.append("--compile")
    return cmd


def run_upstream(what: str, compiled: bool, args) -> dict:
    """One upstream measurement in the reference environment (`upstream_command`);
    {'error': ...} when it fails."""
    cmd = upstream_command(what, compiled, args)
    env = {**os.environ, "UPSTREAM_DIR": str(args.upstream_dir)}
    if args.upstream_huge_pages:
        env["GLIBC_TUNABLES"] = host_memory.TUNABLE
    mode = "compile" if compiled else "eager"
    print(f"[{what}] upstream {mode}: {' '.join(cmd)}", flush=True)
    start, load_before = time.perf_counter(), load()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=args.upstream_timeout)
        if proc.returncode:
            raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}")
        raw = last_json(proc.stdout)
    except Exception as e:  # one failing mode (e.g. no C++ compiler for inductor) is reported
        print(f"  failed: {type(e).__name__}: {e}", flush=True)
        return {"error": f"{type(e).__name__}: {e}"[-800:], "load_before": load_before}
    seconds = upstream_seconds(what, raw)
    print(f"  {seconds['total']:.3f} s (load {load_before})", flush=True)
    return {"seconds": seconds, "wall_s": time.perf_counter() - start,
            "load_before": load_before, "raw": raw}


def dtype_of(what: str, args) -> str:
    return "float32" if what == "vae" else args.dtype


def run_ours(what: str, args) -> dict:
    """Our side in this process: {'seconds': {'total': s, ...}, 'raw': result dict}."""
    tiny, dtype = args.tiny, dtype_of(what, args)
    load_before = load()
    print(f"[{what}] ours{' (tiny)' if tiny else ''}", flush=True)
    if what == "train_b1":
        from bench import train_step

        r = train_step.run("lightningdit", "tiny" if tiny else "B/1", 8, dtype,
                           args.steps, args.warmup, peak_matmul_n=256 if tiny else 2048)
        seconds = {"total": r["step_s"]}
    elif what == "sample_b1":
        from bench import sample

        r = sample.run("tiny" if tiny else "B/1", 8, dtype, args.steps, args.warmup,
                       num_steps=0)
        seconds = {"total": r["call_s"]}
    elif what == "sample_run_b1":
        from bench import sample

        r = sample.run("tiny" if tiny else "B/1", 8, dtype, 1, 0, num_steps=args.sample_steps)
        seconds = {"total": r["sample_s"]}
    elif what == "vae":
        from bench import vae

        r = vae.run("tiny" if tiny else "f16d32", 32 if tiny else 256, 1, "float32",
                    args.steps, args.warmup)
        seconds = {"total": r["encode_decode_s"], "encode": r["encode_s"],
                   "decode": r["decode_s"]}
    else:
        raise SystemExit(f"unknown --what {what!r}: {', '.join(WHATS)}")
    print(f"  {seconds['total']:.3f} s (load {load_before})", flush=True)
    if r.get("mfu") is not None:
        print(f"  MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:.3f} TFLOP/s "
              f"({r['peak_source']})", flush=True)
    return {"seconds": seconds, "load_before": load_before, "raw": r}


def flops_per_call(what: str, raw: dict, side: str = "ours") -> float:
    """FLOPs of one measured call (the same model on both sides), from our side's result. The
    whole sample differs: upstream runs both halves at every call (`side="upstream"`)."""
    if what == "train_b1":
        return raw["flops_per_image"] * raw["batch"]
    if what == "sample_b1":
        return raw["flops_per_call"]
    if what == "sample_run_b1":
        return raw["sample_flops_both_halves" if side == "upstream" else "sample_flops"]
    return raw["batch"] * (raw["encode_flops_per_image"] + raw["decode_flops_per_image"])


def matmul_peaks(args) -> dict:
    """Each side's own matmul library on this CPU now: {'xla': {dtype: TFLOP/s}, 'torch':
    {dtype: TFLOP/s}} (torch's from the reference environment; absent when that fails)."""
    n = 256 if args.tiny else 2048
    dtypes = sorted({"float32", args.dtype})
    peaks = {"xla": {d: common.measured_matmul_tflops(n, dtype=common.jnp_dtype(d))
                     for d in dtypes}}
    cmd = [args.refenv_python, str(TORCH_MATMUL_SCRIPT), "--n", str(n), "--threads", "2",
           "--dtypes", ",".join(dtypes)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}")
        measured = last_json(proc.stdout)
        peaks["torch"] = {d: measured["tflops"][d] for d in dtypes}
        for d, size in measured.get("sizes", {}).items():
            if size != n:  # no fast kernel for d here (bf16 without bf16 instructions)
                print(f"  torch {d} matmul timed at {size}^3: {n}^3 would take minutes",
                      flush=True)
    except Exception as e:  # the ratios stand without it
        peaks["torch_error"] = f"{type(e).__name__}: {e}"[-400:]
    return peaks


def best_peaks(*measured: dict) -> dict:
    """The better of each library's measurements (a neighbour's load only ever lowers them)."""
    out = {}
    for side in ("xla", "torch"):
        runs = [m[side] for m in measured if side in m]
        if runs:
            out[side] = {d: max(r[d] for r in runs) for d in runs[0]}
    return out


def add_fractions_of_peak(what: str, out: dict, peaks: dict, args) -> None:
    """Each side's achieved TFLOP/s as a fraction of its own library's matmul rate: when the
    ratio upstream / ours is low but ours uses more of XLA's peak than upstream of torch's, the
    difference is in the matmul libraries on this CPU, not in the programs."""
    flops = flops_per_call(what, out["ours"]["raw"])
    dtype = dtype_of(what, args)
    out["flops_per_call"] = flops
    out["ours_fraction_of_xla_peak"] = (flops / out["ours"]["seconds"]["total"] / 1e12
                                        / peaks["xla"][dtype])
    best = out.get("upstream_best")
    if best and "torch" in peaks:
        upstream_s = out[f"upstream_{best}"]["seconds"]["total"]
        upstream_flops = flops_per_call(what, out["ours"]["raw"], side="upstream")
        out["upstream_fraction_of_torch_peak"] = (upstream_flops / upstream_s / 1e12
                                                  / peaks["torch"][dtype])


def compare_one(what: str, args) -> dict:
    out = {"upstream_eager": run_upstream(what, False, args)}
    if not args.skip_compile:
        out["upstream_compile"] = run_upstream(what, True, args)
    out["ours"] = run_ours(what, args)
    ok = {mode: r["seconds"] for mode, r in out.items()
          if mode != "ours" and "seconds" in r}
    ours = out["ours"]["seconds"]
    out["target"] = TARGETS[what]
    out["dtype"] = dtype_of(what, args)
    if what == "train_b1":
        out["upstream_ema"] = args.upstream_ema
    out["upstream_huge_pages"] = args.upstream_huge_pages
    for mode, secs in ok.items():
        out[f"ratio_vs_{mode.removeprefix('upstream_')}"] = secs["total"] / ours["total"]
    if ok:
        best = min(ok, key=lambda m: ok[m]["total"])
        out["upstream_best"] = best.removeprefix("upstream_")
        out["ratio"] = ok[best]["total"] / ours["total"]
        out["parts_ratio"] = {k: ok[best][k] / v for k, v in ours.items()}
        out["meets_target"] = out["ratio"] >= TARGETS[what]
    if out["ours"]["raw"].get("mfu") is not None:
        out["ours_mfu"] = out["ours"]["raw"]["mfu"]
        out["peak_tflops"] = out["ours"]["raw"]["peak_tflops"]
    return out


def print_table(results: dict) -> None:
    def cell(r, key="total"):
        return f"{r['seconds'][key]:.3f}" if "seconds" in r else "failed"

    print("\nseconds per call (median); ratio = faster upstream / ours (> 1: ours faster)")
    header = f"{'what':14s} {'up eager':>9s} {'up compile':>11s} {'ours':>8s} {'ratio':>7s}"
    print(header + f" {'target':>7s}")
    for what, r in results.items():
        parts = list(r["ours"]["seconds"])
        for part in parts:
            name = what if part == "total" else f"  {part}"
            compile_cell = cell(r["upstream_compile"], part) if "upstream_compile" in r else "-"
            ratio = r.get("parts_ratio", {}).get(part)
            ratio_cell = f"{ratio:.2f}x" if ratio is not None else "n/a"
            target = f"{r['target']:.1f}x" if part == "total" else ""
            print(f"{name:14s} {cell(r['upstream_eager'], part):>9s} {compile_cell:>11s} "
                  f"{r['ours']['seconds'][part]:8.3f} {ratio_cell:>7s} {target:>7s}")


def print_peaks(results: dict, peaks: dict, torch_error: str | None) -> None:
    print("\nmatmul peaks (best of before and after, TFLOP/s): "
          + ", ".join(f"{side} {d} {v:.3f}" for side, by in peaks.items() for d, v in by.items()))
    if torch_error:
        print(f"  torch's peak not measured: {torch_error}")
    print("fraction of its own library's peak: upstream (torch) / ours (XLA)")
    for what, r in results.items():
        up = r.get("upstream_fraction_of_torch_peak")
        up_cell = f"{100 * up:.0f}%" if up is not None else "n/a"
        print(f"{what:14s} {up_cell:>5s} / {100 * r['ours_fraction_of_xla_peak']:.0f}%")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", default=",".join(WHATS),
                        help=f"comma-separated, from {', '.join(WHATS)}")
    parser.add_argument("--refenv_python", default="/tmp/refenv/bin/python",
                        help="python of the reference environment (setup_refenv.sh)")
    parser.add_argument("--upstream_dir", default="/tmp/upstream",
                        help="exported hustvl/LightningDiT work tree")
    parser.add_argument("--bench_cpu", default=str(DEFAULT_BENCH_CPU),
                        help="the shared tools' upstream/bench_cpu.py")
    parser.add_argument("--skip_compile", action="store_true",
                        help="upstream eager only (no torch.compile run)")
    parser.add_argument("--upstream_timeout", type=float, default=1800.0,
                        help="seconds per upstream run")
    parser.add_argument("--upstream_ema", action=argparse.BooleanOptionalAction, default=True,
                        help="train_b1: upstream's step includes train.py's EMA update, as ours "
                             "(--no-upstream_ema: bench_cpu.py's step without it)")
    parser.add_argument("--upstream_huge_pages", action="store_true",
                        help="upstream's processes get glibc's huge-page tunable too "
                             "(GLIBC_TUNABLES, as launch.host_memory gives ours)")
    parser.add_argument("--sample_steps", type=int, default=50,
                        help="sample_run_b1: grid points of the whole sample (released: 250; "
                             "the share of calls before the interval is about the same)")
    parser.add_argument("--tiny", action="store_true",
                        help="our side on the tiny models (tests; the ratios mean nothing)")
    common.common_args(parser)
    args = parser.parse_args(argv)
    common.start(args)
    whats = [w.strip() for w in args.what.split(",") if w.strip()]
    unknown = [w for w in whats if w not in WHATS]
    if unknown:
        parser.error(f"unknown --what {unknown}: choose from {', '.join(WHATS)}")

    missing = [f"{flag} {path}" for flag, path in (
        ("--refenv_python", args.refenv_python), ("--upstream_dir", args.upstream_dir),
        ("--bench_cpu", args.bench_cpu)) if not os.path.exists(path)]
    if missing:
        tools = pathlib.Path(args.bench_cpu).parent
        message = SETUP_HELP.format(missing="; ".join(missing), readme=tools / "README.md",
                                    setup=tools / "setup_refenv.sh")
        print(message, file=sys.stderr)
        common.emit({"bench": "compare", "error": "upstream environment missing",
                     "missing": missing})
        raise SystemExit(2)

    started = load()
    peaks_before = matmul_peaks(args)
    results = {what: compare_one(what, args) for what in whats}
    peaks_after = matmul_peaks(args)
    peaks = best_peaks(peaks_before, peaks_after)
    for what, r in results.items():
        add_fractions_of_peak(what, r, peaks, args)
    print_table(results)
    print_peaks(results, peaks, None if "torch" in peaks else peaks_before.get("torch_error"))
    summary = {what: {k: v for k, v in r.items() if k not in ("upstream_eager",
                                                              "upstream_compile", "ours")}
               for what, r in results.items()}
    for what, r in results.items():
        for mode in ("upstream_eager", "upstream_compile", "ours"):
            if mode in r:
                summary[what][f"{mode}_s"] = r[mode].get("seconds", {}).get("total")
                summary[what][f"{mode}_load"] = r[mode].get("load_before")
                if "error" in r[mode]:
                    summary[what][f"{mode}_error"] = r[mode]["error"]
    common.emit({"bench": "compare", "what": whats, "dtype": args.dtype,
                 "steps": args.steps, "warmup": args.warmup, "matmul_peak_tflops": peaks,
                 "tiny": args.tiny, "load_at_start": started, "load_at_end": load(),
                 **common.device_info(), "results": summary})


if __name__ == "__main__":
    main()
