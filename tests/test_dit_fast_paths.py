"""The explicit matmul / attention paths of dit_jax.ops against JAX's own ops.

`dense_matmul` and `chunked_attention` carry hand-written backward passes (and, in bf16 on CPU,
explicit layout changes): their values and gradients must equal what autodiff of the plain
ops gives, and a bf16 LightningDiT must differentiate on every shape class (small dots used to
reach an XLA:CPU fallback that rejects bf16 x bf16 -> f32). The bf16 cases run both CPU paths:
native bf16 dots (AVX512-BF16 / AMX / Arm BF16) and the float32 kernels used without them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import LightningDiT, ops
from dit_jax.layers import SwiGLUFFN, apply_rope, rope_tables
from dit_jax.ops import dense_matmul, dot_product_attention


@pytest.fixture(params=["bf16_dots", "float32_dots"])
def cpu_path(request, monkeypatch):
    """Run a bf16 test on either CPU path, whatever this host has."""
    native = request.param == "bf16_dots"
    monkeypatch.setattr(ops, "cpu_has_bf16_dots", lambda: native)
    return native


def _relative(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("in_ndim, x_shape, k_shape", [
    (1, (2, 5, 12), (12, 3, 4, 6)),   # qkv-like: chunked output axes
    (2, (2, 5, 4, 6), (4, 6, 12)),    # attention proj: two contracted axes
    (1, (3, 12), (12, 2, 12)),        # adaLN: few rows (dx through transposed g and result)
    (1, (2, 20, 16), (16, 4)),        # SwiGLU output: wide input (dkernel: x^T g as it comes)
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_matmul_value_and_gradients(in_ndim, x_shape, k_shape, dtype, cpu_path):
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape)
    kernel = jax.random.normal(kk, k_shape) / np.sqrt(np.prod(k_shape[:in_ndim]))
    out_shape = x_shape[: len(x_shape) - in_ndim] + k_shape[in_ndim:]
    g = jax.random.normal(kg, out_shape)
    contract = (tuple(range(len(x_shape) - in_ndim, len(x_shape))), tuple(range(in_ndim)))

    def reference(x, kernel):  # float32 throughout
        return jax.lax.dot_general(x, kernel, (contract, ((), ())))

    def ours(x, kernel):
        return dense_matmul(x.astype(dtype), kernel, in_ndim).astype(jnp.float32)

    y_ref, vjp_ref = jax.vjp(reference, x, kernel)
    y, vjp = jax.jit(lambda x, k: jax.vjp(ours, x, k))(x, kernel)
    dx_ref, dk_ref = vjp_ref(g)
    dx, dk = vjp(g)
    assert y.shape == out_shape and dk.dtype == kernel.dtype
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    for got, want in ((y, y_ref), (dx, dx_ref), (dk, dk_ref)):
        assert _relative(got, want) < tol


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_explicit_attention_matches_jax(dtype, cpu_path):
    kq, kk, kv, kg = jax.random.split(jax.random.key(1), 4)
    shape = (2, 10, 3, 8)  # (B, T, H, hd)
    q, k, v, g = (jax.random.normal(key, shape) for key in (kq, kk, kv, kg))

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")

    def ours(q, k, v):
        cast = lambda a: a.astype(dtype)  # noqa: E731
        return dot_product_attention(cast(q), cast(k), cast(v), "explicit").astype(jnp.float32)

    out_ref, vjp_ref = jax.vjp(reference, q, k, v)
    out, vjp = jax.jit(lambda q, k, v: jax.vjp(ours, q, k, v))(q, k, v)
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    assert _relative(out, out_ref) < tol
    for got, want in zip(vjp(g), vjp_ref(g)):
        assert _relative(got, want) < tol


@pytest.mark.parametrize("kwargs, batch", [
    (dict(patch_size=1, use_swiglu=True, use_rope=True, use_rmsnorm=True), 1),
    (dict(patch_size=1, use_swiglu=True, use_rope=True, use_rmsnorm=True), 6),
    (dict(patch_size=2, use_qknorm=True, learn_sigma=True), 3),
    (dict(patch_size=1, use_qknorm=True, use_rmsnorm=True, wo_shift=True), 2),
])
def test_bfloat16_model_differentiates(kwargs, batch, cpu_path):
    model = LightningDiT(input_size=8, in_channels=4, depth=2, hidden_size=32, num_heads=2,
                         num_classes=10, **kwargs)
    x = jax.random.normal(jax.random.key(0), (batch, 8, 8, 4))
    t, y = jnp.linspace(0.1, 0.9, batch), jnp.arange(batch) % 10
    params = jax.jit(model.init)(jax.random.key(1), x, t, y)["params"]
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape),
                          params)  # leave the zero-initialised adaLN / final layer

    def loss(m, p):
        return jnp.mean((m.apply({"params": p}, x, t, y) - x) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
    g32 = grad(model, params)
    g16 = grad(model.clone(dtype=jnp.bfloat16), params)
    for a in jax.tree.leaves(g16):
        assert a.dtype == jnp.float32 and np.isfinite(np.asarray(a)).all()
    flat16 = np.concatenate([np.ravel(a) for a in jax.tree.leaves(g16)])
    flat32 = np.concatenate([np.ravel(a) for a in jax.tree.leaves(g32)])
    assert _relative(flat16, flat32) < 5e-2


def _transposed_shapes(fn, *args) -> list:
    """The result shapes of every transpose in fn's lowered (not yet optimised) program."""
    text = jax.jit(fn).lower(*args).as_text()
    return [line.rsplit("-> ", 1)[1] for line in text.splitlines()
            if "stablehlo.transpose" in line]


@pytest.mark.parametrize("swap", [False, True])
def test_pinned_transposes_read_their_input_buffer_directly(swap):
    """The compiled transpose of `_transpose` / `_swap` reads its operand's buffer as it is:
    a bitcast between them (the inner barrier on a flattened array did that) takes XLA:CPU
    off its fast transpose loop."""
    a = jnp.ones((2, 40, 24) if swap else (40, 24))
    text = jax.jit(ops._swap if swap else ops._transpose).lower(a).compile().as_text()
    names, operands = {}, []
    for line in text.splitlines():
        if " = " in line:
            name, rest = line.strip().removeprefix("ROOT ").split(" = ", 1)
            names[name] = rest
            if " transpose(" in rest:
                operands.append(rest.split(" transpose(", 1)[1].split(")", 1)[0])
    assert operands, text
    for operand in operands:
        assert " parameter(" in names[operand.split()[-1]], (operand, text)


def test_own_loop_transpose_is_a_loop_of_its_own():
    """`matrix_transpose(own_loop=True)`: a^T whatever a's first element (the conditional's
    predicate), and in the compiled program no fused loop holds both the transpose and the
    elementwise ops that produce or read it."""
    a = jnp.arange(12.0).reshape(3, 4) - 1.0
    for first in (1.0, -1.0, jnp.nan):
        b = a.at[0, 0].set(first)
        np.testing.assert_array_equal(ops.matrix_transpose(b, own_loop=True), b.T)
    program = jax.jit(lambda h: ops.matrix_transpose(h * 2, own_loop=True) + 1).lower(a).compile()
    loops, current = [], None
    for line in program.as_text().splitlines():
        if line.startswith("%fused_computation"):
            current = []
            loops.append(current)
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    with_transpose = [loop for loop in loops if any(" transpose(" in op for op in loop)]
    assert with_transpose, program.as_text()
    for loop in with_transpose:
        assert not any(f" {op}(" in line for line in loop for op in ("multiply", "add")), loop


def _minor_axis_transposes(compiled_text: str) -> list[list[int]]:
    """The result shapes of the compiled transposes that move the minor axis."""
    shapes = []
    for line in compiled_text.splitlines():
        if " transpose(" not in line:
            continue
        result = line.split(" = ", 1)[1].split("{", 1)[0]  # e.g. f32[3,768,128]
        dims = [int(d) for d in line.split("dimensions={", 1)[1].split("}", 1)[0].split(",")]
        if dims[-1] != len(dims) - 1:
            shapes.append([int(d) for d in result.split("[", 1)[1].rstrip("]").split(",")])
    return shapes


@pytest.mark.parametrize("own_loop", [False, True])
def test_matrix_transpose_leaves_power_of_two_minor_dimensions(own_loop):
    """`matrix_transpose` of a (384, 768) array is a^T whatever its first element (either branch
    of the conditional), and every transpose XLA compiles for it that moves the minor axis
    leaves a power-of-two minor dimension (384 = 3 x 128: blocks of 128 rows), the only shape
    XLA:CPU runs as a tiled loop; a plain transpose leaves 384."""
    a = jax.random.normal(jax.random.key(0), (384, 768))
    assert a.size >= ops.MIN_BLOCKED_TRANSPOSE
    transpose = jax.jit(ops.matrix_transpose, static_argnums=1)
    for first in (1.0, -1.0, jnp.nan):
        b = a.at[0, 0].set(first)
        np.testing.assert_array_equal(transpose(b, own_loop), b.T)
    shapes = _minor_axis_transposes(transpose.lower(a, own_loop).compile().as_text())
    assert shapes and all(s[-1] & (s[-1] - 1) == 0 for s in shapes), shapes
    assert _minor_axis_transposes(jax.jit(ops._transpose).lower(a).compile().as_text()) == [
        [768, 384]]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_gradients_through_blocked_transposes(dtype, monkeypatch):
    """The dense backward's transposes in blocks (at every size here: x's 120 = 8 x 15 rows,
    and the bf16 kernels' 12 = 4 x 3 row result) give the very gradients of the one-loop
    transposes. Kernels: x^T is the smaller side (24 -> 64), or g^T x is (24 -> 12)."""
    monkeypatch.setattr(ops, "cpu_has_bf16_dots", lambda: True)
    x = jax.random.normal(jax.random.key(0), (3, 40, 24)).astype(dtype)
    grads = {}
    for name, minimum in (("blocked", 0), ("plain", 2**62)):
        monkeypatch.setattr(ops, "MIN_BLOCKED_TRANSPOSE", minimum)
        for kernel in (jax.random.normal(jax.random.key(1), (24, 64)),
                       jax.random.normal(jax.random.key(2), (24, 12))):
            y, vjp = jax.vjp(lambda x, k: dense_matmul(x, k, 1), x, kernel)
            grads.setdefault(name, []).extend(vjp(jnp.cos(y)))
    for blocked, plain in zip(grads["blocked"], grads["plain"]):
        np.testing.assert_array_equal(blocked, plain)


@pytest.mark.parametrize("native", [True, False])
def test_float32_kernels_take_transposed_operands(native, monkeypatch):
    """dx = g . w^T is one dot with no transpose of the weight in every kernel (YNNPACK packs
    it at full rate, bf16 ones included); in float32 kernels the attention transposes nothing,
    while the bf16 kernels get row-major operands there, and never a transposed (T, T) one."""
    monkeypatch.setattr(ops, "cpu_has_bf16_dots", lambda: native)
    x = jax.random.normal(jax.random.key(0), (40, 24)).astype(jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(1), (24, 16))

    def dense_fwd_bwd(x, kernel):
        y, vjp = jax.vjp(lambda x, k: dense_matmul(x, k, 1), x, kernel)
        return vjp(jnp.ones_like(y))

    # dkernel transposes x (the smaller side); dx transposes nothing.
    shapes = _transposed_shapes(dense_fwd_bwd, x, kernel)
    assert len(shapes) == 1 and shapes[0].startswith("tensor<24x40x"), shapes
    # x wider than g (the SwiGLU output): float32 kernels contract x^T g as it comes (no
    # transpose left to fuse into the optimizer); the bf16 kernels get g^T x, transposed back
    narrow = kernel[:, :4]
    assert _transposed_shapes(dense_fwd_bwd, x.astype(jnp.float32), narrow) == []
    shapes = _transposed_shapes(dense_fwd_bwd, x, narrow)
    # (the result's transpose twice: both branches of `matrix_transpose`'s conditional)
    expected = ["tensor<4x40xbf16>", "tensor<24x4xbf16>", "tensor<24x4xbf16>"]
    assert shapes == (expected if native else []), shapes

    q, k, v = (jax.random.normal(jax.random.key(i), (3, 10, 4)) for i in range(3))

    def attention_fwd_bwd(q, k, v):
        out, vjp = jax.vjp(ops.chunked_attention, q[None], k[None], v[None])
        return vjp(out)

    assert _transposed_shapes(attention_fwd_bwd, q, k, v) == []
    bf16 = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    shapes = _transposed_shapes(attention_fwd_bwd, *bf16)
    assert (len(shapes) > 0) == native and not any("10x10" in s for s in shapes), shapes


def test_attention_runs_in_one_chunk_per_image():
    """One CPU device: up to 8 independent attention calls (a divisor of the batch) while each
    keeps 2^18 score entries, equal to one call over the whole batch; small attentions and
    sharded meshes stay in one call."""
    b1 = 12 * 256 * 256  # scores per image of LightningDiT-B/1
    assert [ops.attention_chunks(b, 12, 256) for b in (1, 2, 6, 8, 12, 32)] == \
        [1, 2, 6, 8, 6, 8]
    assert ops.attention_chunks(8, 4, 16) == 1 and ops.attention_chunks(64, 4, 16) == 1
    assert ops.attention_chunks(16, 12, 64) == 2  # B/2: 8 images x 12 x 64 x 64 >= 2^18
    assert b1 >= ops.MIN_CHUNK_SCORES
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ("data",))):
        assert ops.attention_chunks(8, 12, 256) == 1
    q, k, v = (jax.random.normal(jax.random.key(i), (8, 256, 4, 8)) for i in range(3))
    text = jax.jit(dot_product_attention).lower(q, k, v).as_text()
    assert text.count("stablehlo.exponential") == 8  # one softmax per image
    whole = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    np.testing.assert_allclose(jax.jit(dot_product_attention)(q, k, v), whole, rtol=1e-5,
                               atol=1e-6)


def _count_ops(fn, name, *args) -> int:
    """How many `name` ops (e.g. "pad") fn's lowered program holds."""
    return jax.jit(fn).lower(*args).as_text().count(f"stablehlo.{name}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_attention_and_unstack_gradients_stack(dtype):
    """The chunks' and q / k / v's gradients are stacked (one concatenation), not padded to
    full size and summed as JAX's rule for slices does, and equal autodiff of the plain ops."""
    qkv = jax.random.normal(jax.random.key(0), (8, 256, 3, 4, 8)).astype(dtype)
    g = jax.random.normal(jax.random.key(1), (8, 256, 4, 8)).astype(dtype)

    def ours(qkv):
        q, k, v = ops.unstack(qkv, 2)
        return dot_product_attention(q, k, v, "explicit").astype(jnp.float32)

    def plain(qkv):
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        return dot_product_attention(q, k, v, "explicit").astype(jnp.float32)

    def grad(fn):
        return lambda qkv: jax.vjp(fn, qkv)[1](g.astype(jnp.float32))[0]

    assert ops.attention_chunks(8, 4, 256) == 8
    assert _count_ops(grad(ours), "pad", qkv) == 0
    assert _count_ops(grad(plain), "pad", qkv) > 0  # the control: JAX's own rule pads
    np.testing.assert_array_equal(jax.jit(grad(ours))(qkv), jax.jit(grad(plain))(qkv))


def _rotate_half_rope(x, cos, sin):
    """Upstream's form: x * cos + rotate_half(x) * sin, rotate_half (x0, x1) -> (-x1, x0)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rope_equals_rotate_half_exactly(dtype):
    """apply_rope's signed-sin form gives upstream's products bit for bit (negation is
    exact), and so does its gradient, whose program has no pad."""
    cos, sin = (jnp.asarray(a).astype(dtype) for a in rope_tables(8, 4))
    x = jax.random.normal(jax.random.key(0), (2, 16, 3, 8)).astype(dtype)
    g = jax.random.normal(jax.random.key(1), x.shape).astype(dtype)
    ours, theirs = (jax.jit(lambda x, f=f: jax.vjp(lambda x: f(x, cos, sin), x))
                    for f in (apply_rope, _rotate_half_rope))
    (y, vjp), (y_ref, vjp_ref) = ours(x), theirs(x)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    np.testing.assert_array_equal(np.asarray(vjp(g)[0], np.float32),
                                  np.asarray(vjp_ref(g)[0], np.float32))
    assert _count_ops(lambda x: jax.vjp(lambda x: apply_rope(x, cos, sin), x)[1](g), "pad",
                      x) == 0


def _dot_operand_types(fn, *args) -> set:
    """The operand element types of every dot_general in fn's lowered program."""
    text = jax.jit(fn).lower(*args).as_text()
    lines = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert lines
    return {line.rsplit(": (", 1)[1].split(") ->")[0].split("x")[-1].rstrip(">")
            for line in lines}


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_dots_follow_the_cpu(native, monkeypatch):
    """With bf16 instructions the dots take bf16 operands; without, float32 ones holding the
    same values, with the same products and float32 sums (equal up to summation order)."""
    monkeypatch.setattr(ops, "cpu_has_bf16_dots", lambda: native)
    x = jax.random.normal(jax.random.key(0), (6, 32)).astype(jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(1), (32, 16))

    def fwd_bwd(x, kernel):
        y, vjp = jax.vjp(lambda x, k: dense_matmul(x, k, 1), x, kernel)
        return y, vjp(jnp.ones_like(y))

    assert _dot_operand_types(fwd_bwd, x, kernel) == ({"bf16"} if native else {"f32"})
    y, (dx, dk) = jax.jit(fwd_bwd)(x, kernel)
    exact = np.asarray(x, np.float64) @ np.asarray(kernel.astype(jnp.bfloat16), np.float64)
    np.testing.assert_allclose(np.asarray(y), exact, rtol=1e-5, atol=1e-5)


def test_cpu_has_bf16_dots_reads_cpuinfo(tmp_path):
    cases = {"flags\t\t: fpu sse2 avx2 f16c\n": False,
             "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n": True,
             "Features\t: fp asimd bf16 i8mm\n": True,
             "processor\t: 0\n": False}
    for i, (text, expected) in enumerate(cases.items()):
        path = tmp_path / f"cpuinfo{i}"
        path.write_text(text)
        assert ops.cpu_has_bf16_dots(str(path)) is expected, text
    assert ops.cpu_has_bf16_dots(str(tmp_path / "missing")) is None


def test_bfloat16_swiglu_rounds_as_torch():
    """In bf16 the SwiGLU hidden layer is torch's bf16 `F.silu(x1) * x2` bit for bit (silu
    computed in float32 and rounded once, then the rounded product), here with identity
    w12 / w3 kernels so that the matmuls pass their inputs through exactly."""
    torch = pytest.importorskip("torch")
    d = 16
    x = jax.random.normal(jax.random.key(0), (2, 5, d)).astype(jnp.bfloat16)
    eye = jnp.eye(d)
    params = {"w12": {"kernel": jnp.stack([eye, eye], axis=1), "bias": jnp.zeros((2, d))},
              "w3": {"kernel": eye, "bias": jnp.zeros((d,))}}
    ffn = SwiGLUFFN(hidden_features=d, dtype=jnp.bfloat16)
    ours = jax.jit(lambda x: ffn.apply({"params": params}, x))(x)
    xt = torch.from_numpy(np.asarray(x, np.float32)).to(torch.bfloat16)
    want = (torch.nn.functional.silu(xt) * xt).float().numpy()
    np.testing.assert_array_equal(np.asarray(ours, np.float32), want)


def test_accelerator_paths_trace_the_accelerator_program():
    """Inside `accelerator_paths` the CPU forms are gone (XLA's attention in one call, no
    pinned transposes) and the values stay; the switch is restored after an error."""
    q, k, v = (jax.random.normal(jax.random.key(i), (8, 256, 4, 8)) for i in range(3))
    w = jax.random.normal(jax.random.key(3), (8, 64)) / 30

    def step(q, k, v, w):
        out = dot_product_attention(q, k, v)  # (8, 256, 4, 8)
        return jnp.sum(dense_matmul(out.reshape(-1, 8), w, 1) ** 2)

    grad = jax.grad(step, argnums=(0, 3))
    cpu_text = jax.jit(grad).lower(q, k, v, w).as_text()
    with ops.accelerator_paths():
        assert not ops.one_cpu_device()
        accelerator_text = jax.jit(grad).lower(q, k, v, w).as_text()
        accelerator = jax.jit(grad)(q, k, v, w)
    if jax.default_backend() == "cpu":
        assert cpu_text.count("stablehlo.exponential") == 8  # the CPU's 8 chunks
        assert "optimization_barrier" in cpu_text  # the weight gradient's pinned x^T
    assert accelerator_text.count("stablehlo.exponential") == 1
    assert "optimization_barrier" not in accelerator_text
    for a, b in zip(accelerator, jax.jit(grad)(q, k, v, w)):
        assert _relative(a, b) < 1e-5
    with pytest.raises(RuntimeError), ops.accelerator_paths():
        raise RuntimeError
    assert ops.one_cpu_device() == (jax.default_backend() == "cpu")
