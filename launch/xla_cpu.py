"""XLA:CPU flags the commands add on a CPU host, before JAX starts its backend.

jaxlib 0.10.2 hands every convolution to YNNPACK on the CPU. XLA's own (Eigen) convolutions,
which ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` restores, measured
faster on a 2-vCPU AMD EPYC (AVX2), runs alternating: f16d32 encode + decode 3.05 / 2.95 ->
2.83 / 2.73 s (`bench.vae`), the VA-VAE f16d32 training step 15.96 -> 14.43 s
(`bench.train_step --model vavae`). Matmuls stay with YNNPACK: without it the guided B/1 call
took 3.36 s instead of 2.39 s. On a CPU with AVX-512 (2-vCPU AMD EPYC Zen 5) YNNPACK's
convolutions were the faster ones: encode + decode 1.01 / 1.04 s against 1.05 / 1.18 s, the
training step 5.51 / 5.50 s against 5.83 / 5.85 s, so the flag is left out there.

Added only where they were measured to be valid: the jaxlib version above (XLA aborts on a
flag it does not know), JAX running on the CPU, a CPU without AVX-512, and XLA_FLAGS not
already choosing the YNN fusion types. ``LDM_XLA_CPU_FLAGS=0`` in the environment leaves
XLA_FLAGS alone.
"""

from __future__ import annotations

import importlib.metadata
import os

from launch import host_memory

VERIFIED_JAXLIB = "0.10.2"
OPTION = "xla_cpu_experimental_ynn_fusion_type"
FLAGS = (f"--{OPTION}=-individual_convolution",)
OPT_OUT_ENV = "LDM_XLA_CPU_FLAGS"

_status: str | None = None


def add_cpu_flags() -> str:
    """Append FLAGS to XLA_FLAGS where they apply; returns "on" or "off: <reason>". Only the
    first call in a process acts."""
    global _status
    if _status is None:
        reason = why_not()
        if reason is None:
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = " ".join((flags, *FLAGS)).strip()
        _status = "on" if reason is None else f"off: {reason}"
    return _status


def status() -> str:
    return _status or "not requested"


def why_not() -> str | None:
    if opt_out := host_memory.opted_out(OPT_OUT_ENV):
        return opt_out
    if OPTION in os.environ.get("XLA_FLAGS", ""):
        return f"XLA_FLAGS already sets {OPTION}"
    if host_memory.backend_started():
        return "JAX's backend had already started"
    if not host_memory.runs_on_cpu():
        return "JAX will run on an accelerator"
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if version != VERIFIED_JAXLIB:
        return f"jaxlib {version} (the flags were measured with {VERIFIED_JAXLIB})"
    if "avx512f" in cpu_flags():
        return "the CPU has AVX-512 (YNNPACK's convolutions measured faster there)"
    return None


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of /proc/cpuinfo's first processor (empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
