"""launch.xla_cpu: the XLA:CPU flags a CPU command adds, where, and that XLA takes them."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from launch import xla_cpu
from tests.helpers import REPO

# add_cpu_flags in a fresh process (JAX not started), then a convolution compiled with the
# resulting XLA_FLAGS: whether XLA took them, and whether YNNPACK still got the convolution.
PROGRAM = r"""
import json, os, sys
from launch import xla_cpu
status = xla_cpu.add_cpu_flags()
import jax, jax.numpy as jnp
x, w = jnp.ones((1, 16, 16, 32)), jnp.ones((3, 3, 32, 32))
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
hlo = conv.lower(x, w).compile().as_text()
print(json.dumps({"status": status, "again": xla_cpu.add_cpu_flags(),
                  "xla_flags": os.environ.get("XLA_FLAGS", ""),
                  "ynn_convolution": "__ynn_fusion" in hlo,
                  "value": float(conv(x, w)[0, 8, 8, 0])}))
"""


def run(**env_overrides) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", xla_cpu.OPT_OUT_ENV, "JAX_PLATFORMS")}
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-c", PROGRAM], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU flags")
def test_a_cpu_command_gives_convolutions_back_to_xla():
    on = run(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    assert on["status"] == "on" and on["again"] == "on"
    assert on["xla_flags"] == "--xla_backend_optimization_level=0 " + " ".join(xla_cpu.FLAGS)
    off = run(JAX_PLATFORMS="cpu", **{xla_cpu.OPT_OUT_ENV: "0"})
    assert off["status"] == f"off: {xla_cpu.OPT_OUT_ENV}=0" and off["xla_flags"] == ""
    # the flag does what it is for on this jaxlib: YNNPACK gets the convolution only without it
    assert off["ynn_convolution"] and not on["ynn_convolution"]
    assert on["value"] == off["value"] == 288.0  # 3 x 3 taps x 32 channels of ones
    # a user's own choice of the option is kept
    own = f"--{xla_cpu.OPTION}=-individual_dot"
    assert run(JAX_PLATFORMS="cpu", XLA_FLAGS=own)["xla_flags"] == own


def test_not_once_jax_has_started(monkeypatch):
    jnp.zeros(1).block_until_ready()  # this process's backend
    monkeypatch.delenv(xla_cpu.OPT_OUT_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert xla_cpu.why_not() == "JAX's backend had already started"


def test_only_for_the_jaxlib_it_was_measured_with(monkeypatch):
    monkeypatch.setattr(xla_cpu, "VERIFIED_JAXLIB", "0.0.1")
    monkeypatch.setattr(xla_cpu.host_memory, "backend_started", lambda: False)
    monkeypatch.setattr(xla_cpu.host_memory, "runs_on_cpu", lambda: True)
    monkeypatch.delenv(xla_cpu.OPT_OUT_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert xla_cpu.why_not().startswith("jaxlib ") and "measured with 0.0.1" in xla_cpu.why_not()


def _step_temp_bytes(remat: bool, compiler_options) -> int:
    """Temporary bytes of a LightningDiT's value-and-gradient (4 blocks, 256 tokens, batch 8)
    compiled with `compiler_options`."""
    from flax import linen as nn

    from dit_jax import LightningDiT

    model = LightningDiT(input_size=16, patch_size=1, in_channels=4, hidden_size=64, depth=4,
                         num_heads=4, num_classes=10, use_swiglu=True, use_rope=True,
                         use_rmsnorm=True, remat=remat)
    x = jax.ShapeDtypeStruct((8, 16, 16, 4), jnp.float32)
    t, y = jax.ShapeDtypeStruct((8,), jnp.float32), jax.ShapeDtypeStruct((8,), jnp.int32)
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"])

    def loss(p, x, t, y):
        return jnp.mean(model.apply({"params": p}, x, t, y) ** 2)

    step = jax.jit(jax.value_and_grad(loss), compiler_options=compiler_options)
    return step.lower(params, x, t, y).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's passes")
def test_remat_steps_keep_remat_s_barriers():
    """With `step_compiler_options` a rematerialising step recomputes each block's activations
    instead of keeping them (XLA:CPU's own passes merge the recomputation back: remat then
    saves nothing); without remat there are no options."""
    assert xla_cpu.step_compiler_options(False) is None
    options = xla_cpu.step_compiler_options(True)
    assert options == xla_cpu.REMAT_COMPILER_OPTIONS
    plain = _step_temp_bytes(False, None)
    assert _step_temp_bytes(True, options) < 0.5 * plain
