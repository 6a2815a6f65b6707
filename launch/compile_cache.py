"""XLA's persistent compilation cache for the launch commands.

Every `launch` command keeps the programs XLA compiles for it in a directory, so that the same
command run again with the same shapes (a training run resumed after preemption, the next
`launch.sample` chunk, the demo run a second time) loads them instead of compiling again. JAX
keys each program by its HLO, compile options, XLA flags, jaxlib version and device kind, and
writes only programs that took at least a second to compile (JAX's option
``jax_persistent_cache_min_compile_time_secs``), from process 0 of a multi-process run (the
others only read).

Where (`directory`): ``--compilation_cache_dir`` (every launch command has it); its default is
``$XDG_CACHE_HOME/vavae-lightningdit-jax/xla`` (``~/.cache/...`` without XDG_CACHE_HOME). An
empty value, or ``LDM_COMPILATION_CACHE=0`` in the environment, turns the cache off; a
JAX_COMPILATION_CACHE_DIR set in the environment is JAX's own setting and is left as it is
when the flag is not given. For every host of a multi-host run to load the programs, give a
directory they all mount.

On the CPU the programs go in a subdirectory named after the host's CPU (`cpu_fingerprint`):
JAX's key names the platform ("cpu"), not the instruction set XLA compiled for, so a home
directory shared by hosts of two CPU generations could otherwise hand a program using AVX-512
to a host without it.
"""

from __future__ import annotations

import hashlib
import os
import platform

from launch import host_memory

OPT_OUT_ENV = "LDM_COMPILATION_CACHE"
JAX_ENV = "JAX_COMPILATION_CACHE_DIR"
APP_DIR = os.path.join("vavae-lightningdit-jax", "xla")
CPUINFO = "/proc/cpuinfo"

_EVENTS = {"/jax/compilation_cache/cache_hits": "loaded",
           "/jax/compilation_cache/cache_misses": "written"}
_SAVED_EVENT = "/jax/compilation_cache/compile_time_saved_sec"
_counts = {"loaded": 0, "written": 0, "saved_s": 0.0}
_status: str | None = None


class CacheDirError(OSError):
    """An explicitly given cache directory that cannot be created or written."""


def default_directory() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, APP_DIR)


def cpu_fingerprint(cpuinfo: str | None = None) -> str:
    """'cpu-' and 12 hex digits of a hash of the CPU's model name and instruction-set flags
    (the first processor of /proc/cpuinfo; elsewhere `platform.processor()` and the machine)."""
    text = ""
    try:
        with open(cpuinfo or CPUINFO) as f:
            first = f.read().split("\n\n")[0]
        fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        text = "|".join((fields.get("model name", ""), fields.get("flags", fields.get(
            "Features", ""))))
    except OSError:
        pass
    if not text.strip("|"):
        text = f"{platform.machine()}|{platform.processor()}"
    return "cpu-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def configure(flag_value: str | None) -> str:
    """Point JAX's persistent cache at the directory `flag_value` (None: not given on the
    command line, so the default) and count its hits; returns "on: <dir>" or "off: <why>".

    Raises CacheDirError for an explicitly given directory that cannot be created; the
    default one failing only turns the cache off (a read-only home must not stop a run)."""
    global _status
    if opt_out := host_memory.opted_out(OPT_OUT_ENV):
        _status = f"off: {opt_out}"
        return _status
    if flag_value is None and os.environ.get(JAX_ENV):
        _status = f"on: {os.environ[JAX_ENV]} ({JAX_ENV}, as JAX reads it)"
        _listen()
        return _status
    if flag_value == "":
        _status = "off: --compilation_cache_dir is empty"
        return _status
    directory = os.path.abspath(os.path.expanduser(flag_value or default_directory()))
    if host_memory.runs_on_cpu():
        directory = os.path.join(directory, cpu_fingerprint())
    try:
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"{directory} is not writable")
    except OSError as e:
        if flag_value is not None:
            raise CacheDirError(f"--compilation_cache_dir {flag_value!r}: cannot use "
                                f"{directory} ({e}); give a writable directory, or '' for "
                                "no cache") from e
        _status = f"off: the default directory {directory} cannot be used ({e})"
        return _status
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    _listen()
    _status = f"on: {directory}"
    return _status


def status() -> str:
    return _status or "not configured"


def summary() -> str:
    """One line for the end of a command: what the cache gave this process."""
    if not status().startswith("on"):
        return f"XLA compilation cache {status()}"
    return (f"XLA compilation cache: {_counts['loaded']} programs loaded (saving "
            f"{_counts['saved_s']:.1f} s of compiling), {_counts['written']} compiled and "
            f"written ({status()[len('on: '):]})")


def used() -> bool:
    """Whether this process loaded or wrote any program."""
    return _counts["loaded"] + _counts["written"] > 0


_listening = False


def _listen() -> None:
    global _listening
    if _listening:
        return
    import jax

    def on_event(event: str, **_) -> None:
        if event in _EVENTS:
            _counts[_EVENTS[event]] += 1

    def on_duration(event: str, seconds: float, **_) -> None:
        if event == _SAVED_EVENT:
            _counts["saved_s"] += max(seconds, 0.0)

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    _listening = True
