"""XLA:CPU flags the commands add on a CPU host, before JAX starts its backend.

jaxlib 0.10.2 hands every convolution to YNNPACK on the CPU. XLA's own (Eigen) convolutions,
which ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` restores, measured
faster on a 2-vCPU AMD EPYC (AVX2), runs alternating: f16d32 encode + decode 3.05 / 2.95 ->
2.83 / 2.73 s (`bench.vae`), the VA-VAE f16d32 training step 15.96 -> 14.43 s
(`bench.train_step --model vavae`). Matmuls stay with YNNPACK: without it the guided B/1 call
took 3.36 s instead of 2.39 s. On a 2-vCPU AMD EPYC Zen 5 (AVX-512) YNNPACK's convolutions were
faster for f16d32 at batch 1 (`bench.vae` 1.01 / 1.04 against 1.05 / 1.18 s, the training
step 5.51 / 5.50 against 5.83 / 5.85 s) but slower for the demo's VA-VAE (32 / 64 channels,
32 images of 32x32: 0.365 / 0.365 against 0.263 / 0.269 s per step), the command a CPU user
runs most, so the flag is added on every CPU.

Added only where they were measured to be valid: the jaxlib version above (XLA aborts on a
flag it does not know), JAX running on the CPU, and XLA_FLAGS not already choosing the YNN
fusion types. ``LDM_XLA_CPU_FLAGS=0`` in the environment leaves XLA_FLAGS alone.

`step_compiler_options`: what the training step is compiled with where its model rematerialises
(config.model.remat), on the CPU only.
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
    return None


# XLA:CPU removes optimization barriers (its `cse_barrier_expander` pass) before common
# subexpression elimination, which then merges each block's rematerialised forward with the
# forward it repeats: remat kept every activation and still cost time (LightningDiT-B/1, batch
# 8, bf16: 3.92 GB and 2.54 s per step against 3.99 GB and 2.12 s without remat). Keeping the
# barriers (GPU XLA removes them only after scheduling) gives remat its memory back: 2.37 GB,
# 2.43 s.
REMAT_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def step_compiler_options(remat: bool) -> dict | None:
    """``jax.jit(compiler_options=...)`` for a training step whose model rematerialises
    (`remat`): `REMAT_COMPILER_OPTIONS` on the CPU, else None. Per compilation, so nothing
    else (sampling, the VA-VAE's inference) changes."""
    import jax  # not at import time: the commands add their flags before JAX starts

    if remat and jax.default_backend() == "cpu":
        return dict(REMAT_COMPILER_OPTIONS)
    return None
