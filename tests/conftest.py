"""Test session setup: 8 simulated CPU devices, parsed absl flags, golden-vector access."""

import os

from helpers import xla_flags

# Must happen before jax is imported anywhere: sharding tests need 8 devices on a CPU host.
# Subprocesses the tests start inherit the flags.
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The launch commands the tests start keep no programs in the user's compilation cache
# (tests/test_compile_cache.py gives them one of their own).
os.environ.setdefault("LDM_COMPILATION_CACHE", "0")

import jax  # noqa: E402

# Goldens are float32 references: never let a backend use reduced-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")

import json  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain's multiprocessing reads absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()

from helpers import GOLDEN_DIR, Golden, missing_golden  # noqa: E402


@pytest.fixture(scope="session")
def golden():
    """Loader for `../shared/golden/<name>.npz`; skips when the folder is absent."""
    cache = {}

    def load(name: str) -> Golden:
        path = GOLDEN_DIR / f"{name}.npz"
        if not path.exists():
            missing_golden(path)
        if name not in cache:
            cache[name] = Golden(path)
        return cache[name]

    return load


@pytest.fixture(scope="session")
def manifest():
    def load(name: str) -> dict:
        path = GOLDEN_DIR / "manifests" / f"manifest_{name}.json"
        if not path.exists():
            missing_golden(path)
        return json.loads(path.read_text())

    return load


# With pytest-xdist each worker records its own comparisons: workers write them to a folder the
# controller created, and the controller merges them into one summary.


def pytest_configure(config):
    if not hasattr(config, "workerinput"):
        config.parity_dir = tempfile.mkdtemp(prefix="parity-")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    node.workerinput["parity_dir"] = node.config.parity_dir


def pytest_sessionfinish(session):
    from helpers import PARITY

    workerinput = getattr(session.config, "workerinput", None)
    if workerinput is not None and PARITY:
        path = pathlib.Path(workerinput["parity_dir"]) / f"{workerinput['workerid']}.json"
        path.write_text(json.dumps(PARITY))


def pytest_terminal_summary(terminalreporter, config):
    from helpers import PARITY

    records = dict(PARITY)
    parity_dir = getattr(config, "parity_dir", None)
    if parity_dir:
        for path in pathlib.Path(parity_dir).glob("*.json"):
            records.update({k: tuple(v) for k, v in json.loads(path.read_text()).items()})
        shutil.rmtree(parity_dir, ignore_errors=True)
    if not records:
        return
    terminalreporter.section("parity vs goldens / reference formulas (max abs error; tolerances)")
    width = max(len(k) for k in records)
    for name in sorted(records):
        err, atol, rtol = records[name]
        terminalreporter.write_line(f"{name:<{width}}  {err:9.2e}  (atol {atol:g}, rtol {rtol:g})")
