"""Every speed and memory figure of the performance work on this machine, in one command.

    python -m bench.suite --out runs/suite_h100                    # a GPU / TPU host
    python -m bench.suite --out runs/suite_h100 --budget_s 420 \\
        --upstream_python python3 --upstream_dir /path/to/LightningDiT
    python -m bench.suite --tiny --out /tmp/suite                  # a CPU smoke run (seconds)

Meant for a short lease on an accelerator: it runs the measurements in order of importance
until `--budget_s` is spent, each as its own process (`python -m bench.train_step ...`), so a
batch that runs out of memory ends only its own run, and each run's peak memory is its own.

  train      LightningDiT-XL/1 bfloat16 training step (the loop's jitted, donating step) at each
             batch of `--batches` until one fails; then the first failing batch with --remat.
             MFU against the chip's dense bf16 peak, peak memory and memory per image.
  attention  the largest batch that fitted, with --attention cudnn (flash attention through
             jax.nn.dot_product_attention; GPU only), beside the default run of `train`
             (jax.nn's own choice, XLA's path in jax 0.10-0.11).
  sample     the guided XL/1 call (batch 8 = 4 + 4) and a whole 250-point Euler sample, bf16.
  upstream   with --upstream_python and --upstream_dir: upstream's XL/1 step (bf16 autocast,
             train.py's EMA) at the largest batch that fitted ours, and its guided call, by
             `bench/upstream_torch.py --device cuda` (PyTorch with CUDA and upstream's
             dependencies in that interpreter).
  vae        f16d32 encode + decode at 256x256, float32 batch 1 and bfloat16 batch 8.
  vavae      the VA-VAE f16d32 training step (DINOv2-L and LPIPS in the loop), bf16, batch 8.
  metrics    precision / recall at the ADM evaluation's size (10,000 reference against 50,000
             sample features, 2048-d, float16 distances), by `bench.precision_recall`.

JAX may take 95% of a GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set). Writes
OUT/results.jsonl (one line per run: part, its arguments, return code, seconds, and the
run's JSON result or the last lines of its error) and OUT/summary.md (one table), and prints the
summary as its last line (one JSON object); an OUT holding an earlier suite's results is
refused unless --overwrite. `--tiny` swaps in the CPU-sized models and short
runs, for a check that every part works.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

from bench.argtypes import nonnegative_int, positive_int

PARTS = ("train", "attention", "sample", "upstream", "vae", "vavae", "metrics")
REPO = pathlib.Path(__file__).resolve().parents[1]


class Suite:
    """Runs the parts' commands one after another under one time budget, recording each."""

    def __init__(self, out: pathlib.Path, budget_s: float, per_run_s: float, min_run_s: float):
        self.out, self.deadline = out, time.monotonic() + budget_s
        self.per_run_s, self.min_run_s = per_run_s, min_run_s
        self.records: list[dict] = []

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, part: str, argv: list[str], label: str) -> dict | None:
        """Runs `argv`; returns its last-line JSON, or None if it failed, timed out or was
        skipped for lack of time (each case recorded)."""
        timeout = min(self.per_run_s, self.left_s())
        if timeout < self.min_run_s:
            return self.skip(part, argv, label, f"{self.left_s():.0f} s of budget left")
        record = {"part": part, "label": label, "argv": argv}
        start = time.monotonic()
        try:
            proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                                  timeout=timeout, env=run_env())
        except subprocess.TimeoutExpired as e:
            record.update(status="timeout", seconds=time.monotonic() - start,
                          tail=_text(e.stdout)[-2000:], stderr_tail=_text(e.stderr)[-2000:])
            return self._keep(record).get("result")
        record.update(rc=proc.returncode, seconds=time.monotonic() - start)
        result = last_json_object(proc.stdout) if proc.returncode == 0 else None
        if result is None:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            record.update(status="failed", error=_error_line(lines),
                          tail="\n".join(lines[-15:]))
        else:
            record.update(status="ok", result=result)
        return self._keep(record).get("result")

    def skip(self, part: str, argv: list[str], label: str, reason: str) -> None:
        """Records a run that is not started."""
        self._keep({"part": part, "label": label, "argv": argv, "status": "skipped",
                    "reason": reason})

    def _keep(self, record: dict) -> dict:
        self.records.append(record)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        print(f"[{record['status']:>7}] {record['part']}: {record['label']}"
              + (f" ({record['seconds']:.0f} s)" if "seconds" in record else "")
              + (f": {record.get('error') or record.get('reason')}"
                 if record["status"] != "ok" else ""), flush=True)
        return record


def last_json_object(stdout: str) -> dict | None:
    """A run's last stdout line as a JSON object, or None (no line, not JSON, not an object)."""
    lines = stdout.strip().splitlines()
    try:
        value = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _text(output) -> str:
    """A timed-out run's captured output (bytes, str or None) as text."""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


# Python's "SomeError: ..." / "jaxlib...XlaRuntimeError: ..." line that ends a traceback
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b(:|$)")
# what JAX prints after the exception when it filters its frames out of a traceback
_JAX_FOOTER = ("For simplicity, JAX has removed", "The stack trace below excludes",
               "-----")


def _error_line(lines: list[str]) -> str:
    """The most telling line of a failed run: an out-of-memory error if there is one, else
    the exception line of its traceback, else its last line that is not JAX's footer."""
    for line in reversed(lines):
        if "RESOURCE_EXHAUSTED" in line or "out of memory" in line.lower():
            return line.strip()[:300]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line.strip()):
            return line.strip()[:300]
    for line in reversed(lines):
        if line.strip() and not line.strip().startswith(_JAX_FOOTER):
            return line.strip()[:300]
    return "no output"


def run_env() -> dict:
    """The runs' environment: JAX may take 95% of a GPU's memory (its default, 75%, would
    make "the largest batch that fits" a quarter smaller than what the card holds), and
    PyTorch's allocator may grow segments instead of fragmenting. Set values are kept."""
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


def python_m(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def run_parts(args) -> dict:
    # every argument is checked before anything in --out is created or replaced
    parts = [p.strip() for p in args.only.split(",") if p.strip()] if args.only else list(PARTS)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise SystemExit(f"--only {args.only!r}: parts are {', '.join(PARTS)}")
    out = pathlib.Path(args.out)
    if (out / "results.jsonl").exists() and not args.overwrite:
        raise SystemExit(f"{out / 'results.jsonl'} exists (an earlier suite's results): "
                         f"pass another --out, or --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").unlink(missing_ok=True)
    suite = Suite(out, args.budget_s, args.per_run_s, args.min_run_s)
    tiny = args.tiny
    dit = "tiny" if tiny else args.variant
    timing = ["--steps", args.steps, "--warmup", args.warmup]
    run_upstream = "upstream" in parts and args.upstream_python and not tiny
    summary: dict = {"bench": "suite", "parts": parts, "tiny": tiny}

    def dit_step(batch: int, *extra) -> list[str]:
        return python_m("bench.train_step", "--variant", dit, "--batch", batch, "--dtype",
                        args.dtype, *extra, *timing)

    # -- train: the largest batch that fits, then remat ----------------------------------------
    fitted = None  # (batch, result) of the largest batch that ran
    if "train" in parts or "attention" in parts or run_upstream:
        failed_batch = None
        for batch in args.batches:
            r = suite.run("train", dit_step(batch), f"{dit} {args.dtype} batch {batch}")
            if r is None:
                failed_batch = batch
                break
            fitted = (batch, r)
        if failed_batch is not None:
            r = suite.run("train", dit_step(failed_batch, "--remat"),
                          f"{dit} {args.dtype} batch {failed_batch} remat")
            if r is not None:
                summary["remat"] = _train_summary(failed_batch, r)
        if fitted:
            summary["train"] = _train_summary(*fitted)

    # -- attention implementations at that batch, beside the default the ladder ran ----------
    if "attention" in parts and fitted:
        # off a CPU the default is jax.nn's own choice (XLA's path in jax 0.10-0.11)
        implementations = ["explicit", "xla"] if tiny else ["cudnn"]
        summary["attention"] = {"default": summary["train"]}
        for impl in implementations:
            r = suite.run("attention", dit_step(fitted[0], "--attention", impl),
                          f"{dit} {args.dtype} batch {fitted[0]} attention {impl}")
            if r is not None:
                summary["attention"][impl] = _train_summary(fitted[0], r)

    # -- guided sampling ----------------------------------------------------------------------
    if "sample" in parts:
        r = suite.run("sample", python_m("bench.sample", "--variant", dit, "--batch", 8,
                                         "--dtype", args.dtype, "--num_steps",
                                         5 if tiny else 250, *timing),
                      f"{dit} {args.dtype} guided call batch 8 + whole sample")
        if r is not None:
            summary["sample"] = {k: r.get(k) for k in (
                "call_s", "calls_per_s", "call_tflops_per_s", "sample_s", "num_steps")}

    # -- upstream on the same device ------------------------------------------------------------
    if "upstream" in parts and not run_upstream:
        suite.skip("upstream", [], "upstream runs",
                   "--tiny" if tiny else "no --upstream_python (an interpreter with CUDA "
                   "PyTorch and upstream's dependencies)")
    if run_upstream:
        upstream = [args.upstream_python, "bench/upstream_torch.py", "--device",
                    args.upstream_device,
                    "--variant", args.variant.removeprefix("LightningDiT-"),
                    "--upstream_dir", args.upstream_dir, "--dtype", args.dtype,
                    "--warmup", args.warmup, "--repeats", args.steps]
        if args.upstream_shared:
            upstream += ["--shared", args.upstream_shared]
        batch = fitted[0] if fitted else args.batches[0]
        summary["upstream"] = {}
        for mode in ("eager", "compile"):
            extra = ["--compile"] if mode == "compile" else []
            r = suite.run("upstream", list(map(str, [*upstream, "--what", "train", "--batch",
                                                     batch, "--ema", *extra])),
                          f"upstream {args.variant} train batch {batch} {mode}")
            if r is not None:
                summary["upstream"][f"train_{mode}"] = {
                    "batch": batch, "step_s": r["median_s"],
                    "images_per_s": batch / r["median_s"],
                    "peak_memory_gb": r.get("peak_memory_gb")}
            r = suite.run("upstream", list(map(str, [*upstream, "--what", "sample", "--batch", 8,
                                                     *extra])),
                          f"upstream {args.variant} guided call batch 8 {mode}")
            if r is not None:
                summary["upstream"][f"call_{mode}"] = {"call_s": r["median_s"]}

    # -- VA-VAE -------------------------------------------------------------------------------
    if "vae" in parts:
        vae = "tiny" if tiny else "f16d32"
        size = 32 if tiny else 256
        summary["vae"] = {}
        for dtype, batch in (("float32", 1), (args.dtype, 8)):
            r = suite.run("vae", python_m("bench.vae", "--variant", vae, "--size", size,
                                          "--batch", batch, "--dtype", dtype, *timing),
                          f"{vae} {size}x{size} {dtype} batch {batch}")
            if r is not None:
                summary["vae"][f"{dtype}_b{batch}"] = {
                    k: r.get(k) for k in ("encode_s", "decode_s", "tflops_per_s")}
    if "vavae" in parts:
        batch = 1 if tiny else 8
        r = suite.run("vavae", python_m("bench.train_step", "--model", "vavae", "--variant",
                                        "tiny" if tiny else "f16d32", "--batch", batch,
                                        "--dtype", args.dtype, *timing),
                      f"VA-VAE step {args.dtype} batch {batch}")
        if r is not None:
            summary["vavae"] = _train_summary(batch, r)

    # -- evaluation -----------------------------------------------------------------------------
    if "metrics" in parts:
        sizes = (200, 300, 64) if tiny else (10000, 50000, 2048)
        r = suite.run("metrics", python_m("bench.precision_recall", "--num_real", sizes[0],
                                          "--num_fake", sizes[1], "--dim", sizes[2],
                                          "--steps", 1, "--warmup", 1),
                      f"precision / recall {sizes[0]} x {sizes[1]}, {sizes[2]}-d, float16")
        if r is not None:
            summary["metrics"] = {k: r.get(k) for k in ("seconds", "tflops_per_s", "distances")}

    summary["runs"] = {s: sum(r["status"] == s for r in suite.records)
                       for s in ("ok", "failed", "timeout", "skipped")}
    (out / "summary.md").write_text(markdown(suite.records))
    return summary


def _train_summary(batch: int, r: dict) -> dict:
    peak = r.get("peak_memory_gb")
    return {"batch": batch, "step_s": r["step_s"], "images_per_s": r["images_per_s"],
            "tflops_per_s": r["tflops_per_s"], "mfu": r.get("mfu"), "peak_memory_gb": peak,
            "memory_gb_per_image": peak / batch if peak else None,
            "compile_s": r.get("compile_s"), "device": r.get("device")}


def markdown(records: list[dict]) -> str:
    """One table row per run: what ran and its headline figures."""
    rows = ["| part | run | status | figures |", "|---|---|---|---|"]
    for rec in records:
        r = rec.get("result") or {}
        if rec["status"] != "ok":
            figures = rec.get("error") or rec.get("reason") or rec["status"]
        elif "images_per_s" in r:
            mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
            figures = (f"{r['images_per_s']:.4g} img/s, {r['tflops_per_s']:.4g} TFLOP/s{mfu}, "
                       f"peak {r.get('peak_memory_gb', float('nan')):.3g} GB")
        elif "calls_per_s" in r:
            figures = f"call {r['call_s'] * 1e3:.1f} ms"
            if "sample_s" in r:
                figures += f", {r['num_steps']}-point sample {r['sample_s']:.2f} s"
        elif "distance_flops" in r:
            figures = f"{r['seconds']:.3g} s ({r['tflops_per_s']:.3g} TFLOP/s in the distances)"
        elif "encode_s" in r:
            figures = f"encode {r['encode_s'] * 1e3:.1f} ms, decode {r['decode_s'] * 1e3:.1f} ms"
        elif "median_s" in r:
            figures = f"{r['median_s'] * 1e3:.1f} ms per call"
            if r.get("peak_memory_gb"):
                figures += f", peak {r['peak_memory_gb']:.3g} GB"
        else:
            figures = "ok"
        rows.append(f"| {rec['part']} | {rec['label']} | {rec['status']} | {figures} |")
    return "\n".join(rows) + "\n"


def batch_list(text: str) -> list[int]:
    """argparse type of --batches: '32,64,128' -> [32, 64, 128], each at least 1."""
    batches = [positive_int(b.strip()) for b in text.split(",") if b.strip()]
    if not batches:
        raise argparse.ArgumentTypeError(f"{text!r}: no batch (e.g. 32,64,128)")
    return batches


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for results.jsonl and summary.md")
    parser.add_argument("--only", default="", help=f"comma-separated parts of {PARTS}")
    parser.add_argument("--variant", default="XL/1", help="LightningDiT variant")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--batches", type=batch_list, default="32,64,128",
                        help="training batches tried in order until one fails")
    parser.add_argument("--steps", type=positive_int, default=5, help="timed calls per run")
    parser.add_argument("--warmup", type=nonnegative_int, default=2,
                        help="untimed calls per run")
    parser.add_argument("--budget_s", type=float, default=480.0,
                        help="wall-clock seconds for the whole suite")
    parser.add_argument("--per_run_s", type=float, default=240.0, help="limit per run")
    parser.add_argument("--min_run_s", type=float, default=45.0,
                        help="skip a run when less than this is left of the budget")
    parser.add_argument("--upstream_python", default="",
                        help="an interpreter with CUDA PyTorch and upstream's dependencies")
    parser.add_argument("--upstream_dir", default=os.environ.get("UPSTREAM_DIR",
                                                                 "/tmp/upstream"),
                        help="a work tree of hustvl/LightningDiT")
    parser.add_argument("--upstream_device", default="cuda", choices=("cuda", "cpu"),
                        help="where upstream runs (cpu: to check the upstream runs here)")
    parser.add_argument("--upstream_shared", default="",
                        help="the shared upstream tools' folder (its _common.py), if not "
                             "../shared/upstream")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier suite in --out")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU-sized models and short runs (a smoke test of every part)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batches = [b for b in args.batches if b <= 8] or [2, 4]
        args.min_run_s = min(args.min_run_s, 5.0)
    summary = run_parts(args)
    print((pathlib.Path(args.out) / "summary.md").read_text(), end="")
    print(json.dumps(summary, default=float), flush=True)


if __name__ == "__main__":
    main()
