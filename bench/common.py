"""Shared pieces of the side-by-side benchmarks (`bench.train_step`, `bench.sample`, `bench.vae`,
`bench.compare`): timing, device peak FLOP/s, memory, XLA cost analysis, the JSON last line.

Every entry point prints human-readable lines first and, as its LAST line, one JSON object, so
scripts (and `bench.compare`) read ``stdout.splitlines()[-1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench.argtypes import nonnegative_int, positive_int
from launch import host_memory, xla_cpu

GB = 1e9  # peak_memory_gb is in 10^9 bytes

# Dense bfloat16 peak TFLOP/s per chip, matched against `device.device_kind` (first match wins;
# TPU v5e reports "TPU v5 lite", v5p reports "TPU v5p" or "TPU v5").
KNOWN_PEAKS: tuple[tuple[str, float], ...] = (
    ("h200", 989.0),
    ("h100", 989.0),
    ("a100", 312.0),
    ("v5 lite", 197.0),
    ("v5e", 197.0),
    ("v5p", 459.0),
    ("tpu v5", 459.0),
    ("v4", 275.0),
)


def add_xla_flags(flags: str) -> None:
    """Append `flags` to XLA_FLAGS. XLA reads them when the backend starts: call before the
    first computation (the entry points do it first thing in `main`)."""
    if flags:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()


DTYPES = ("float32", "bfloat16")


def common_args(parser, *, steps: int = 5, warmup: int = 2, dtype: bool = True) -> None:
    if dtype:
        parser.add_argument("--dtype", default="float32", choices=DTYPES,
                            help="compute dtype (bench.compare: train_b1 / sample_b1 on both "
                                 "sides; the VA-VAE stays float32)")
    parser.add_argument("--steps", type=positive_int, default=steps,
                        help="timed calls (median taken)")
    parser.add_argument("--warmup", type=nonnegative_int, default=warmup,
                        help="untimed calls first")
    parser.add_argument("--xla_flags", default="",
                        help="extra XLA_FLAGS for experiments, e.g. '--xla_cpu_use_onednn=true'")
    parser.add_argument("--xla_cpu_flags", action=argparse.BooleanOptionalAction, default=True,
                        help="add launch.xla_cpu's XLA:CPU flags, as the launch commands do")
    parser.add_argument("--huge_pages", action=argparse.BooleanOptionalAction, default=True,
                        help="restart once with glibc's huge-page tunable on a CPU, as the "
                             "launch commands do (launch.host_memory); --no-huge_pages: not")


def attention_arg(parser) -> None:
    from launch.build import ATTENTION_IMPLS

    parser.add_argument("--attention", default="", choices=ATTENTION_IMPLS,
                        help="LightningDiT's attention (config.model.attention_impl): '' the "
                             "backend's default (explicit core on CPU, jax.nn's default, "
                             "XLA's path, elsewhere), "
                             "'explicit', 'xla' (jax.nn's XLA path) or 'cudnn' (flash "
                             "attention, CUDA GPUs only)")


def check_attention(name: str) -> str:
    """`name` if this backend can run it; a readable exit for cuDNN off a GPU (other values
    are checked by `launch.build.dit_kwargs`)."""
    if name == "cudnn" and jax.default_backend() != "gpu":
        raise SystemExit(f"--attention cudnn needs a CUDA GPU; this backend is "
                         f"{jax.default_backend()}")
    return name


def start(args) -> None:
    """First thing in an entry point's `main`, before JAX starts: the --huge_pages restart
    (which re-executes the command with the same arguments), --xla_flags, then the
    --xla_cpu_flags (left out where --xla_flags already chooses the same option)."""
    if args.huge_pages:
        host_memory.use_huge_pages()
    add_xla_flags(args.xla_flags)
    if args.xla_cpu_flags:
        xla_cpu.add_cpu_flags()


def jnp_dtype(name: str):
    if name not in DTYPES:
        raise SystemExit(f"--dtype {name!r}: float32 or bfloat16")
    return jnp.dtype(name)


def time_calls(fn: Callable[[], object], *, steps: int, warmup: int) -> dict:
    """Seconds per call of `fn()` (which returns something to block on), each call timed alone
    after `warmup` untimed calls: median, mean, min, max and the list. (The mean is what a run
    of many calls averages; it differs from the median where some calls are slow, e.g. bf16
    steps on a VM that alternate between two speeds.)"""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(max(1, steps)):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times),
            "min_s": min(times), "max_s": max(times), "times_s": times}


def compile_timed(jitted, *args, **kwargs):
    """(compiled executable, seconds to lower + compile)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - start


def cost_flops(compiled_or_lowered) -> float:
    """XLA's FLOP estimate of a compiled (or lowered) program; nan when it has none."""
    analysis = compiled_or_lowered.cost_analysis()
    if isinstance(analysis, Sequence) and not isinstance(analysis, dict):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return float("nan")
    return float(analysis["flops"])


def memory(compiled, device=None) -> dict:
    """Peak memory of one call in GB: `peak_memory_gb` is the device allocator's high-water mark
    where the backend keeps one (GPU, TPU), else XLA's static estimate from the compiled program
    (arguments + temporaries + outputs - donated aliases), which is also given as
    `xla_memory_gb`."""
    out = {}
    stats = compiled.memory_analysis()
    if stats is not None:
        size = lambda f: int(getattr(stats, f"{f}_size_in_bytes", 0))
        estimate = size("argument") + size("temp") + size("output") - size("alias")
        out["xla_memory_gb"] = estimate / GB
        out["peak_memory_gb"] = estimate / GB
        out["peak_memory_source"] = "xla memory_analysis (argument + temp + output - alias)"
    device = device or jax.devices()[0]
    try:
        device_stats = device.memory_stats()
    except Exception:  # backends without allocator statistics raise or return None
        device_stats = None
    if device_stats and "peak_bytes_in_use" in device_stats:
        out["peak_memory_gb"] = device_stats["peak_bytes_in_use"] / GB
        out["peak_memory_source"] = "device.memory_stats()['peak_bytes_in_use']"
    if device.platform == "cpu":
        # the whole process's high-water mark in GiB (runtime, compiler and host copies
        # included): what upstream's CPU benchmark reports for torch, so the two compare
        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def random_params(abstract, seed: int = 0):
    """Random parameters for a tree of `jax.ShapeDtypeStruct`s, drawn on the host with numpy:
    kernels / tables N(0, 1 / fan_in) (fan_in = all axes but the last), norm scales 1 + noise,
    biases small noise. Timings do not depend on the values (none are denormal), and this
    avoids compiling `model.init` (~0.2 s of XLA time per parameter on CPU)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = getattr(path[-1], "key", "")
        if len(s.shape) >= 2:
            fan_in = max(1, int(np.prod(s.shape[:-1])))
            value = rng.standard_normal(s.shape) / np.sqrt(fan_in)
        else:
            value = (1.0 if name in ("scale", "gamma", "weight") else 0.0) + 0.02 * (
                rng.standard_normal(s.shape))
        return jnp.asarray(value.astype(np.float32), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def measured_matmul_tflops(n: int = 2048, repeats: int = 7, dtype=jnp.float32) -> float:
    """Best TFLOP/s of a jitted (n, n) @ (n, n) matmul of `dtype` operands over `repeats` runs,
    accumulated (and returned) in float32, by the models' own matmul (`dit_jax.ops.
    dense_matmul`): on a CPU without bf16 instructions that runs bf16 operands in float32
    kernels, so the bf16 rate there is about float32's, not that of XLA's slower bf16 dot."""
    from dit_jax.ops import dense_matmul

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(lambda x, y: dense_matmul(x, y, 1).astype(jnp.float32))
    jax.block_until_ready(matmul(a, b))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e12


def device_peak(device=None, matmul_n: int = 2048, dtype: str = "float32") -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from): the known dense bf16 peak of a GPU / TPU chip, or on
    CPU (and unknown chips) a matmul of `dtype` operands (float32 accumulation) measured now:
    a bfloat16 run's MFU is then taken against the bfloat16 rate, here about twice float32's."""
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    if device.platform != "cpu":
        for key, peak in KNOWN_PEAKS:
            if key in kind:
                return peak, f"table: {device.device_kind} dense bf16"
    short = {"float32": "f32", "bfloat16": "bf16"}[jnp_dtype(dtype).name]
    return measured_matmul_tflops(matmul_n, dtype=jnp_dtype(dtype)), f"measured {short} matmul"


def device_info() -> dict:
    d = jax.devices()[0]
    info = {"device": d.device_kind, "platform": d.platform, "jax": jax.__version__}
    if d.platform == "cpu":
        info["cpu_count"] = os.cpu_count()
        info["machine"] = platform.machine()
        try:
            info["load_avg_1m"] = os.getloadavg()[0]
        except OSError:
            pass
        info["huge_pages"] = host_memory.status()
        info["xla_cpu_flags"] = xla_cpu.status()
    if os.environ.get("XLA_FLAGS"):
        info["xla_flags"] = os.environ["XLA_FLAGS"]
    return info


def emit(result: dict) -> None:
    """The entry points' last line: one JSON object."""
    sys.stdout.flush()
    print(json.dumps(result, default=float), flush=True)


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"
