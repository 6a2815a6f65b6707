"""Transparent huge pages for XLA's CPU buffers (glibc's `glibc.malloc.hugetlb` tunable).

On the CPU backend XLA allocates the temporaries of each call as one block with
`posix_memalign` (2.8 GB for the LightningDiT-B/1 training step at batch 8). glibc serves a
block that large with a fresh `mmap` and unmaps it on `free`, so every step faults its whole
working set in again, one 4 KiB page at a time: measured on 2 AMD EPYC cores, 680k page faults
and about 2 s of kernel time in each 9.2 s B/1 step. With ``GLIBC_TUNABLES=
glibc.malloc.hugetlb=1`` glibc asks the kernel for transparent huge pages on those blocks
(`madvise(MADV_HUGEPAGE)`): 2k faults of 2 MiB each, and only the kernel's zeroing of the
pages remains. Memory is still returned to the kernel at every `free`, as before.

glibc reads its tunables once, when a process starts, so `use_huge_pages` re-executes the
command (same process id, interpreter and arguments) with the tunable added, before JAX starts
its backend. It does so only where it helps and is safe: the process is one of this project's
commands (`python -m launch.*` / `bench.*`, never an importing program such as a notebook or
pytest), Linux with glibc >= 2.35, the kernel's THP mode is 'madvise' (with 'always' the
kernel already uses huge pages, with 'never' it cannot), and JAX will run on the CPU.
``LDM_HUGE_PAGES=0`` in the environment turns it off.

(Keeping freed blocks mapped instead, with `mallopt` settings that move every allocation onto
one never-trimmed heap, removed the faults completely but fragmented that heap in some runs:
the resident size doubled and steps became slower. Not used.)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys

OPT_OUT_ENV = "LDM_HUGE_PAGES"
TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
COMMAND_PACKAGES = ("launch", "bench")

_status: str | None = None


def use_huge_pages() -> str:
    """Re-execute this command with glibc's huge-page tunable where that applies (see the
    module docstring). Returns (in the process that goes on) "on", or "off: <reason>"."""
    global _status
    if _status is not None:
        return _status
    if _has_tunable():
        _status = "on"
        return _status
    if thp_mode() == "always":
        _status = "on (the kernel's THP mode is 'always')"
        return _status
    reason = why_not()
    if reason is not None:
        _status = f"off: {reason}"
        return _status
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (tunables, TUNABLE) if t))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError as e:  # the command goes on without huge pages
        _status = f"off: re-executing failed ({e})"
    return _status


def status() -> str:
    """What `use_huge_pages` found in this process ("not requested" before it was called)."""
    if _status is None and _has_tunable():
        return "on"
    return _status or "not requested"


def _has_tunable() -> bool:
    return TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def opted_out(env_name: str) -> str | None:
    """"NAME=value" when the environment variable `env_name` says no (0 / false / no / off)."""
    value = os.environ.get(env_name, "1")
    return f"{env_name}={value}" if value.strip().lower() in ("0", "false", "no", "off") else None


def why_not() -> str | None:
    """Why this process would not re-execute itself, or None."""
    if opt_out := opted_out(OPT_OUT_ENV):
        return opt_out
    main_module = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main_module is None or main_module.name.split(".")[0] not in COMMAND_PACKAGES:
        return "not a launch / bench command"
    if not sys.platform.startswith("linux") or not glibc_has_hugetlb(platform.libc_ver()):
        return "needs Linux with glibc >= 2.35"
    mode = thp_mode()
    if mode != "madvise":
        return f"transparent huge pages are '{mode}'"
    if backend_started():
        return "JAX's backend had already started"
    if not runs_on_cpu():
        return "JAX will run on an accelerator"
    return None


def glibc_has_hugetlb(libc: tuple[str, str]) -> bool:
    """`platform.libc_ver()` -> whether it has the tunable (glibc 2.35)."""
    name, version = libc
    try:
        return name == "glibc" and tuple(int(p) for p in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def thp_mode(path: str | None = None) -> str:
    """The kernel's transparent-huge-page mode: the bracketed word of `path` (default
    THP_MODE_FILE; 'always [madvise] never' -> 'madvise'), or 'unknown'."""
    try:
        with open(path or THP_MODE_FILE) as f:
            words = f.read().split()
    except OSError:
        return "unknown"
    chosen = [w[1:-1] for w in words if w.startswith("[") and w.endswith("]")]
    return chosen[0] if chosen else "unknown"


def backend_started() -> bool:
    """Whether this process's JAX has started its backend (False before `import jax`)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started and started())


def runs_on_cpu(asked: str | None = None) -> bool:
    """Whether JAX's default backend will be the CPU, decided without starting it: the
    platforms asked for (`asked`, default JAX_PLATFORMS / jax_platforms, e.g. "cuda,cpu"),
    else whether a TPU runtime or an accelerator plugin (CUDA, ROCm, ...) is installed, which
    JAX would pick first."""
    if asked is None:
        asked = os.environ.get("JAX_PLATFORMS", "")
        if "jax" in sys.modules:
            asked = sys.modules["jax"].config.jax_platforms or asked
    platforms = {p.strip().lower() for p in asked.split(",") if p.strip()}
    if platforms:
        return platforms == {"cpu"}
    if importlib.util.find_spec("libtpu") is not None:
        return False
    if importlib.util.find_spec("jax_plugins") is not None:
        return False
    return not list(importlib.metadata.entry_points(group="jax_plugins"))
