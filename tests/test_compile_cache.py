"""XLA's persistent compilation cache for the launch commands (`launch.compile_cache`)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import REPO, xla_flags

from launch import compile_cache


@pytest.fixture
def fresh(monkeypatch):
    """The module as a new process finds it, with jax.config.update recorded, not applied."""
    updates = {}
    monkeypatch.setattr(compile_cache, "_status", None)
    monkeypatch.setattr(compile_cache, "_listen", lambda: None)
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.__setitem__(name, value))
    for name in (compile_cache.OPT_OUT_ENV, compile_cache.JAX_ENV, "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return updates


def test_default_directory_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_directory() == str(tmp_path / "vavae-lightningdit-jax" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.default_directory() == os.path.join(
        os.path.expanduser("~"), ".cache", "vavae-lightningdit-jax", "xla")


def test_cpu_fingerprint_names_the_instruction_set(tmp_path):
    def info(flags: str, model: str = "Some CPU") -> str:
        path = tmp_path / f"cpuinfo_{len(list(tmp_path.iterdir()))}"
        path.write_text(f"processor\t: 0\nmodel name\t: {model}\nflags\t\t: {flags}\n\n"
                        f"processor\t: 1\nmodel name\t: other\nflags\t\t: other\n")
        return compile_cache.cpu_fingerprint(str(path))

    avx2, avx512 = info("fpu sse avx avx2"), info("fpu sse avx avx2 avx512f")
    assert avx2 != avx512 and avx2 == info("fpu sse avx avx2")  # the first processor's
    assert avx2 != info("fpu sse avx avx2", model="Another CPU")
    assert avx2.startswith("cpu-") and len(avx2) == len("cpu-") + 12
    missing = compile_cache.cpu_fingerprint(str(tmp_path / "none"))  # no /proc: the platform's
    assert missing.startswith("cpu-") and missing == compile_cache.cpu_fingerprint(
        str(tmp_path / "none"))


def test_configure_points_jax_at_a_directory_per_cpu(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    status = compile_cache.configure(None)
    want = tmp_path / "xdg" / "vavae-lightningdit-jax" / "xla" / compile_cache.cpu_fingerprint()
    assert status == f"on: {want}" and fresh == {"jax_compilation_cache_dir": str(want)}
    assert want.is_dir()

    fresh.clear()
    assert compile_cache.configure(str(tmp_path / "mine")).startswith(f"on: {tmp_path / 'mine'}")
    assert fresh["jax_compilation_cache_dir"].startswith(str(tmp_path / "mine" / "cpu-"))


def test_configure_off_and_left_to_jax(fresh, monkeypatch, tmp_path):
    assert compile_cache.configure("") == "off: --compilation_cache_dir is empty"
    monkeypatch.setenv(compile_cache.OPT_OUT_ENV, "0")
    assert compile_cache.configure(str(tmp_path)) == "off: LDM_COMPILATION_CACHE=0"
    monkeypatch.delenv(compile_cache.OPT_OUT_ENV)
    monkeypatch.setenv(compile_cache.JAX_ENV, str(tmp_path / "jax_own"))
    assert compile_cache.configure(None).startswith(f"on: {tmp_path / 'jax_own'} (")
    assert fresh == {}  # JAX read its variable itself
    assert compile_cache.configure(str(tmp_path / "flag")).startswith(f"on: {tmp_path / 'flag'}")
    assert compile_cache.summary().startswith("XLA compilation cache: 0 programs loaded")


def test_configure_refuses_an_unusable_directory_it_was_given(fresh, monkeypatch, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(compile_cache.CacheDirError, match="--compilation_cache_dir .*a_file"):
        compile_cache.configure(str(a_file / "cache"))
    # the default place failing (a read-only home) only turns the cache off
    monkeypatch.setenv("XDG_CACHE_HOME", str(a_file))
    assert compile_cache.configure(None).startswith("off: the default directory")
    assert fresh == {}


SAMPLE = ["launch.sample", "--config", "configs/lightningdit.py:tiny", "--num_samples", "8",
          "--config.sample.batch_size=4", "--config.sample.num_steps=2", "--grid", "0"]


def test_a_second_run_loads_its_programs_and_makes_the_same_images(tmp_path):
    """`launch.sample` twice with one cache: the second run compiles nothing and writes the
    images of the first; a cache directory that is a file is one error line."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(2), LDM_COMPILATION_CACHE="1",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # the tiny programs too

    def sample(workdir: str, cache: str, returncode: int = 0) -> str:
        proc = subprocess.run([sys.executable, "-m", *SAMPLE, "--workdir", str(tmp_path / workdir),
                               "--compilation_cache_dir", cache], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == returncode, proc.stderr[-3000:]
        return proc.stderr

    cache = tmp_path / "cache"
    first, second = sample("one", str(cache)), sample("two", str(cache))
    assert "XLA compilation cache: 0 programs loaded" in first
    written = int(first.split("compiled and written")[0].rsplit(",", 1)[1])
    assert written > 0 and len(list(next(cache.iterdir()).iterdir())) == written
    assert f"XLA compilation cache: {written} programs loaded" in second
    assert ", 0 compiled and written" in second
    with np.load(tmp_path / "one" / "samples.npz") as a, \
            np.load(tmp_path / "two" / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])

    err = sample("three", str(tmp_path / "one" / "samples.npz"), returncode=1)
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: --compilation_cache_dir ")
