"""launch.host_memory: a CPU command restarts itself once with glibc's huge-page tunable, and
with it a call's big temporary is faulted in as 2 MiB pages instead of 4 KiB ones.

Page faults are counted, not timed, so nothing here depends on the machine's load.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

from launch import host_memory
from tests.helpers import REPO, xla_flags

# Runs as a launch command would: the restart re-executes this same `python -c` program, so it
# prints its "started" line twice, from the same process id, the second time with the tunable.
RESTART = r"""
import json, os, sys, types
sys.modules["__main__"].__spec__ = types.SimpleNamespace(name="launch.some_command")
from launch import host_memory
host_memory.THP_MODE_FILE = sys.argv[1]
print(json.dumps({"started": os.getpid()}), flush=True)
status = host_memory.use_huge_pages()
print(json.dumps({"status": status, "again": host_memory.use_huge_pages(),
                  "tunables": os.environ.get("GLIBC_TUNABLES"), "pid": os.getpid()}))
"""

# A call with a 256 MB temporary (a loop carry XLA cannot fuse away), run five times; prints
# the temporary's size and the minor page faults of each call after the first.
FAULTS = r"""
import json, resource
import jax, jax.numpy as jnp

@jax.jit
def call(x):
    big = jnp.broadcast_to(x[:, None], (x.shape[0], 4096))  # (16384, 4096) float32
    big = jax.lax.fori_loop(0, 2, lambda i, b: b * 1.0001 + i, big)
    return jnp.sum(big)

x = jnp.ones((16384,), jnp.float32)
temp = call.lower(x).compile().memory_analysis().temp_size_in_bytes
faults = []
for i in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    call(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults[1:], "temp": temp}))
"""

PAGES_OF_TEMPORARY = 256 * 2**20 // 4096  # 65,536 pages of 4 KiB
HAS_TUNABLE = sys.platform.startswith("linux") and host_memory.glibc_has_hugetlb(
    platform.libc_ver())


def run_python(code: str, *args: str, **env_overrides) -> list[dict]:
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
    for name in ("GLIBC_TUNABLES", host_memory.OPT_OUT_ENV):
        env.pop(name, None)
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.skipif(not HAS_TUNABLE, reason="needs Linux with glibc >= 2.35")
def test_a_cpu_command_restarts_once_with_the_tunable(tmp_path):
    thp = tmp_path / "enabled"
    thp.write_text("always [madvise] never\n")
    first, second, final = run_python(RESTART, str(thp))
    assert first == second  # the same process id, started twice
    assert final == {"status": "on", "again": "on", "tunables": host_memory.TUNABLE,
                     "pid": first["started"]}
    # no restart where the kernel uses huge pages anyway, cannot, or the user said no
    thp.write_text("[always] madvise never\n")
    _, final = run_python(RESTART, str(thp))
    assert final["status"].startswith("on (") and final["tunables"] is None
    thp.write_text("always madvise [never]\n")
    _, final = run_python(RESTART, str(thp))
    assert final["status"] == "off: transparent huge pages are 'never'"
    thp.write_text("always [madvise] never\n")
    _, final = run_python(RESTART, str(thp), **{host_memory.OPT_OUT_ENV: "0"})
    assert final["status"] == f"off: {host_memory.OPT_OUT_ENV}=0"
    _, final = run_python(RESTART, str(thp), JAX_PLATFORMS="cuda")
    assert final["status"] == "off: JAX will run on an accelerator"


@pytest.mark.skipif(not HAS_TUNABLE or host_memory.thp_mode() != "madvise",
                    reason="needs glibc >= 2.35 and the kernel's THP mode 'madvise'")
def test_the_tunable_faults_a_temporary_in_as_huge_pages():
    (default,) = run_python(FAULTS)
    (huge,) = run_python(FAULTS, GLIBC_TUNABLES=host_memory.TUNABLE)
    assert default["temp"] >= PAGES_OF_TEMPORARY * 4096
    assert min(default["faults"]) > 0.9 * PAGES_OF_TEMPORARY, default  # glibc's default
    assert max(huge["faults"]) < 0.05 * PAGES_OF_TEMPORARY, huge


def test_never_restarts_an_importing_program():
    # this pytest process is not a launch / bench command
    assert host_memory.why_not() in ("not a launch / bench command",
                                     f"{host_memory.OPT_OUT_ENV}="
                                     f"{os.environ.get(host_memory.OPT_OUT_ENV)}")


@pytest.mark.parametrize("platforms, on_cpu", [("cpu", True), ("cuda", False), ("tpu", False),
                                               ("cuda,cpu", False), (" CPU ", True)])
def test_runs_on_cpu_reads_the_platforms_asked_for(platforms, on_cpu):
    assert host_memory.runs_on_cpu(platforms) is on_cpu


def test_thp_mode_and_glibc_version(tmp_path):
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    assert host_memory.thp_mode(str(mode)) == "madvise"
    assert host_memory.thp_mode(str(tmp_path / "missing")) == "unknown"
    assert host_memory.glibc_has_hugetlb(("glibc", "2.36"))
    assert not host_memory.glibc_has_hugetlb(("glibc", "2.31"))
    assert not host_memory.glibc_has_hugetlb(("", ""))
