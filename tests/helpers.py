"""Shared test helpers: golden-vector access and layout conversion."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_DIR = pathlib.Path(os.environ.get("GOLDEN_DIR", REPO.parent / "shared" / "golden"))


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` simulated CPU devices. The suite's time is
    mostly XLA compiling tiny programs: LLVM at -O0 compiles them in about half the time (the
    programs are the same, only their machine code is less optimised)."""
    return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"


def missing_golden(path):
    """CI sets REQUIRE_GOLDEN=1 so that absent vectors fail instead of skipping silently."""
    message = f"golden file not found: {path} (set GOLDEN_DIR to the shared/golden folder)"
    if os.environ.get("REQUIRE_GOLDEN") == "1":
        pytest.fail(message)
    pytest.skip(message)


def nhwc(a: np.ndarray) -> np.ndarray:
    """NCHW golden arrays -> NHWC (any leading axes before C, H, W are kept)."""
    return np.moveaxis(a, -3, -1)


class Golden:
    """One golden .npz: `g['out']`, `g.params` (upstream state dict), `g.meta` (its JSON)."""

    def __init__(self, path: pathlib.Path):
        with np.load(path, allow_pickle=False) as data:
            self.arrays = {k: data[k] for k in data.files}
        self.meta = json.loads(str(self.arrays.pop("meta_json", "{}")))
        self.name = path.stem

    def __getitem__(self, key):
        return self.arrays[key]

    def __contains__(self, key):
        return key in self.arrays

    def group(self, prefix: str) -> dict[str, np.ndarray]:
        """Arrays under `prefix.` with the prefix removed (e.g. 'params' -> state dict)."""
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.arrays.items() if k.startswith(prefix + ".")}

    @property
    def params(self) -> dict[str, np.ndarray]:
        return self.group("params")




# Max abs error observed per golden comparison; printed at the end of the run (conftest).
PARITY: dict[str, tuple[float, float, float]] = {}


def assert_close(got, want, *, atol: float = 1e-4, rtol: float = 1e-4, name: str) -> float:
    """`np.testing.assert_allclose` that also records the max abs error under `name`."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != golden {want.shape}"
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    PARITY[name] = (err, atol, rtol)
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=name)
    return err


def run_module(*args: str, timeout: int = 300, with_stderr: bool = False, returncode: int = 0):
    """Run ``python -m <args>`` from the repository root (2 simulated devices), expecting exit
    status `returncode`; return stdout, or (stdout, stderr) `with_stderr`."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(2))
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == returncode, proc.stderr[-3000:]
    return (proc.stdout, proc.stderr) if with_stderr else proc.stdout


def run_processes(argv: list[str], num_processes: int = 2, devices_per_process: int = 2,
                  timeout: int = 300, as_flags: bool = False,
                  process_args=None, check: bool = True) -> list:
    """Run `argv` (after the python executable) as a real multi-process JAX job on this host:
    `num_processes` CPU processes joined through launch.distributed (told by environment
    variables, or by --coordinator_address / --num_processes / --process_id flags when
    `as_flags`); `process_args(i)` adds arguments to process i's; returns their stdouts, or
    with `check=False` each one's (returncode, stdout, stderr) whatever its status. Processes
    still running when this returns or fails are killed."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(num_processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=xla_flags(devices_per_process),
                   PYTHONPATH=str(REPO))
        where = dict(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                     process_id=i)
        if as_flags:
            args = [*argv, *(f"--{k}={v}" for k, v in where.items())]
        else:
            args = list(argv)
            env.update({f"JAX_{k.upper()}": str(v) for k, v in where.items()})
        if process_args is not None:
            args += list(process_args(i))
        procs.append(subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    try:
        for i, proc in enumerate(procs):
            out, err = proc.communicate(timeout=timeout)
            assert not check or proc.returncode == 0, f"process {i}: {err[-3000:]}"
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            proc.kill()
    return [out for _, out, _ in results] if check else results


def manifest_pattern(key: str) -> str:
    """Upstream key with its block / level indices replaced by '#'."""
    return re.sub(r"\b(blocks|down|up|block|attn)\.\d+", r"\1.#", key)


def assert_manifest_names(state_dict, entries, prefix=""):
    """The manifest's key names (indices aside) and dtypes, for a model of another size."""
    want = {manifest_pattern(e["key"][len(prefix):]): e["dtype"] for e in entries
            if e["key"].startswith(prefix)}
    got = {manifest_pattern(k): str(v.dtype).removeprefix("torch.") for k, v in state_dict.items()}
    assert got == want
