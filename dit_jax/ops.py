"""Matmul and attention with explicit backward passes: LightningDiT's fast paths.

`dense_matmul` is every LightningDiT matmul (float32 accumulation for 16-bit inputs, both
gradient matmuls in the compute dtype, as torch autocast); `dot_product_attention` picks the
explicit `chunked_attention` on CPU and ``jax.nn.dot_product_attention`` on GPU / TPU (its
default, XLA's path in jax 0.10-0.11; 'cudnn' asks for cuDNN flash attention). Both equal the
plain JAX ops within float32 rounding (tests/test_dit_fast_paths.py); what each buys on CPU is
measured in docs/performance.md.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp

Dtype = jnp.dtype


_accelerator_trace = False


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu" and not _accelerator_trace


@contextlib.contextmanager
def accelerator_paths():
    """Trace, inside this block, the program a GPU or TPU runs whatever the backend: every
    CPU path here and in `vavae_jax.conv` is left out (XLA's attention, no pinned layouts, no
    attention chunks, 16-bit dots in any form). For what is measured on a CPU on the
    accelerators' behalf (`bench.train_memory`); the result still runs on a CPU. JAX's caches
    are cleared on the way in and out: jit reuses a function's trace whatever the paths."""
    global _accelerator_trace
    previous, _accelerator_trace = _accelerator_trace, True
    jax.clear_caches()
    try:
        yield
    finally:
        _accelerator_trace = previous
        jax.clear_caches()


def one_cpu_device() -> bool:
    """Traced for one CPU device (no mesh, or a one-device one): only then are the operand
    layouts pinned below (`_transpose`, `_swap`). A pinned layout is a flattened array, which
    SPMD cannot partition along a transposed sharded axis: on a sharded mesh it would
    all-gather the activations (`bench.collectives`), so there XLA keeps its own forms.
    `vavae_jax.conv` uses the same test for its flattened kernel gradients."""
    if not _on_cpu():
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


CPUINFO = "/proc/cpuinfo"
BF16_DOT_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16 / AMX, Arm BF16


@functools.cache
def cpu_has_bf16_dots(cpuinfo: str = CPUINFO) -> bool | None:
    """Whether the host CPU has bf16 dot-product instructions (`BF16_DOT_FLAGS` in its
    /proc/cpuinfo flags); None where that cannot be read (not Linux).

    XLA:CPU's bf16 x bf16 -> float32 matmuls run at twice the float32 rate on an AVX512-BF16
    CPU but at about half of it on an AVX2 one (2048^3: 0.093 against 0.168 TFLOP/s), where
    `_dot` therefore runs the same products in float32 kernels."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return any(flag in flags for flag in BF16_DOT_FLAGS)


def _accumulation_dtype(dtype: Dtype) -> Dtype:
    """float32 accumulation (and result) for 16-bit inputs: torch autocast's numerics, and on
    CPU the only fast bf16 matmul (bf16 -> bf16 dots run slower than float32 there)."""
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype


def _bf16_in_float32_kernels(dtype: Dtype) -> bool:
    """bf16 operands on a CPU without bf16 instructions, which `_dot` casts to float32: the
    same products (bf16 x bf16 is exact in float32; the sums are float32 either way) in
    faster kernels."""
    return jnp.dtype(dtype) == jnp.bfloat16 and _on_cpu() and cpu_has_bf16_dots() is False


def _row_major_kernels(dtype: Dtype) -> bool:
    """Whether a dot of `dtype` operands reaches XLA:CPU's 16-bit kernels, which take only
    the canonical row-major form (see `_dot`). Every other dot takes its operands in any
    form: float32 kernels (YNNPACK packs a transposed operand at full rate: g . w12^T,
    2048 x 4096 x 768, 71 ms against 72 ms for the row-major product, which also needed a
    10 ms weight transpose) and every dot on GPU / TPU."""
    return (_on_cpu() and jnp.dtype(dtype).itemsize < 4
            and not _bf16_in_float32_kernels(dtype))


def _dot(x: jax.Array, y: jax.Array, contract: tuple, batch: tuple = ((), ()),
         out_dtype: Dtype | None = None) -> jax.Array:
    """``lax.dot_general(x, y, (contract, batch))`` with float32 accumulation, cast to
    `out_dtype` (default: x's dtype).

    On a CPU with bf16 instructions (`cpu_has_bf16_dots`; without them the operands go to
    float32 first) XLA:CPU runs bf16 x bf16 -> f32 dots at twice the float32 rate through
    YNNPACK, but only in the canonical (batch, free, contracted) x (batch, contracted, free)
    row-major form, or, unbatched, with y as (free, contracted): x . y^T (AMD EPYC Zen 5,
    AVX512-BF16: g . w12^T at 2048 x 4096 x 768 14.6 ms either way). It sends some other forms
    to a fallback that rejects this type combination, and transposes others into layouts it
    then runs slowly (x^T . g for w12: 45 against 16 ms with x transposed first). On CPU,
    16-bit operands are therefore transposed into such a form explicitly (`materialise`); the
    callers already pass it for those kernels (`_bmm_nt`, `_bmm_tn`). Other dots take any
    form (`_row_major_kernels`).
    """
    accumulate, out_dtype = _accumulation_dtype(x.dtype), out_dtype or x.dtype
    if _bf16_in_float32_kernels(x.dtype):
        x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    elif _row_major_kernels(x.dtype):
        (x_contract, y_contract), (x_batch, y_batch) = contract, batch
        x_free = [a for a in range(x.ndim) if a not in (*x_contract, *x_batch)]
        y_free = [a for a in range(y.ndim) if a not in (*y_contract, *y_batch)]
        x_order, y_order = (*x_batch, *x_free, *x_contract), (*y_batch, *y_contract, *y_free)
        # an unbatched y (free, contracted) is taken as it comes: x . y^T at the same rate
        y_nt = not y_batch and (*y_free, *y_contract) == tuple(range(y.ndim))
        if x_order != tuple(range(x.ndim)):
            x = materialise(x.transpose(x_order))
        if y_order != tuple(range(y.ndim)) and not y_nt:
            y = materialise(y.transpose(y_order))
        nb, nc = len(x_batch), len(x_contract)
        y_contract = tuple(range(y.ndim - nc, y.ndim)) if y_nt else tuple(range(nb, nb + nc))
        contract = (tuple(range(x.ndim - nc, x.ndim)), y_contract)
        batch = (tuple(range(nb)), tuple(range(nb)))
    out = jax.lax.dot_general(x, y, (contract, batch), preferred_element_type=accumulate)
    return out.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def unstack(x: jax.Array, axis: int) -> tuple[jax.Array, ...]:
    """The slices of x along `axis` (``jnp.unstack``), with a backward that stacks their
    gradients in one concatenation. JAX's own rule pads each slice's gradient to x's full
    shape and sums them; XLA:CPU fuses that sum with the layout changes around it into one
    slow loop (the B/1 qkv gradient at batch 8 in bf16: 15 against 25 ms per layer). Only for
    q / k / v: on the SwiGLU halves it kept both as extra float32 residuals (+9.5 GiB for an
    XL/1 step at batch 32)."""
    return tuple(jax.lax.index_in_dim(x, i, axis, keepdims=False) for i in range(x.shape[axis]))


def _unstack_forward(x, axis):
    return unstack(x, axis), None


def _unstack_backward(axis, _, grads):
    return (jnp.stack(grads, axis=axis),)


unstack.defvjp(_unstack_forward, _unstack_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense_matmul(x: jax.Array, kernel: jax.Array, in_ndim: int) -> jax.Array:
    """x (*lead, *K) @ kernel (*K, *F) -> (*lead, *F), K = the last `in_ndim` axes of x; the
    kernel (a parameter, any dtype) is cast to x's dtype inside, so the backward keeps the
    parameter itself, not a second low-precision copy of every weight.

    The result is float32 for 16-bit inputs (the accumulator), else x's dtype. The explicit
    backward (dx = g . kernel^T over F, dkernel = x^T . g over the leading axes) runs both
    gradient matmuls in x's dtype with float32 accumulation (torch autocast's backward), where
    JAX's own transpose rule would mix a float32 cotangent with 16-bit operands: measured on
    this CPU, a (2048 x 768) @ (768 x 3072) forward + backward in bfloat16 takes a third of
    the time, and in float32 no longer.
    """
    return _dense_forward(x, kernel, in_ndim)[0]


def _dense_forward(x, kernel, in_ndim):
    out_shape = x.shape[:x.ndim - in_ndim] + kernel.shape[in_ndim:]
    out_dtype = _accumulation_dtype(x.dtype)
    if one_cpu_device():
        x2, w2 = _as_matrices(x, kernel.astype(x.dtype), in_ndim)
        y = _dot(x2, w2, ((1,), (0,)), out_dtype=out_dtype)
    else:
        contract = (tuple(range(x.ndim - in_ndim, x.ndim)), tuple(range(in_ndim)))
        y = _dot(x, kernel.astype(x.dtype), contract, out_dtype=out_dtype)
    return y.reshape(out_shape), (x, kernel)


def _dense_backward(in_ndim, residuals, g):
    x, kernel = residuals
    g = g.astype(x.dtype)
    if one_cpu_device():
        x2, w2 = _as_matrices(x, kernel.astype(x.dtype), in_ndim)
        g2 = g.reshape(x2.shape[0], w2.shape[1])
        dx = _matmul_nt(g2, w2).reshape(x.shape)
        dkernel = _matmul_tn(x2, g2).reshape(kernel.shape)
    else:  # sharded: the unflattened axes keep their shardings (see `one_cpu_device`)
        out_axes = tuple(range(in_ndim, kernel.ndim))
        dx = _dot(g, kernel.astype(x.dtype), (tuple(range(g.ndim - len(out_axes), g.ndim)),
                                              out_axes))
        lead = tuple(range(x.ndim - in_ndim))
        dkernel = _dot(x, g, (lead, lead))
    return dx, dkernel.astype(kernel.dtype)


def _as_matrices(x, kernel, in_ndim):
    """x (*lead, *K) -> (M, K) and kernel (*K, *F) -> (K, N): free reshapes, so that every
    transpose below is a 2-D one (XLA:CPU runs a (768, 6, 768) -> (6, 768, 768) transpose
    of the same bytes five times slower than the (768, 4608) -> (4608, 768) one)."""
    k = math.prod(kernel.shape[:in_ndim])
    return x.reshape(-1, k), kernel.reshape(k, -1)


def _transpose(a: jax.Array, axes: tuple | None = None) -> jax.Array:
    """``a.transpose(axes)`` (default: all axes reversed, (R, C) -> (C, R)) between two
    barriers, so XLA keeps the operand chosen here (without the inner one it folds the
    transpose of a matmul's result into the matmul). The inner barrier keeps a's own shape:
    on the flattened array it left bitcasts between a's buffer and the transpose, which took
    XLA:CPU off its fast transpose loop (a (2048, 768) float32 buffer: 5.6 against 0.9 ms)."""
    return materialise(jax.lax.optimization_barrier(a).transpose(axes))


# Below this many elements a transpose keeps XLA's one loop whatever its shape (the blocks'
# conditional costs ~40 us; a (640, 256) transpose takes ~0.2 ms either way).
MIN_BLOCKED_TRANSPOSE = 2**18


def matrix_transpose(a: jax.Array, own_loop: bool = False) -> jax.Array:
    """a (R, C) -> (C, R) as a row-major array, through XLA:CPU's tiled transpose loop.

    XLA:CPU emits a transpose as a tiled loop (strips of the input staged in a buffer) only
    where the input's row count R, the result's minor dimension, is a power of two; for any
    other R it gathers element by element, at a fifth of the rate or less: (768, 2048) bf16
    took 4.4 ms, (2048, 768) 0.6 ms; (6144, 768) bf16 15 ms. So where R = q * p, p the largest
    power of two dividing R, the rows are transposed in q blocks of p, (q, p, C) -> (q, C, p),
    and the blocks interleaved, (q, C, p) -> (C, q, p), a copy of p-element rows run in a
    conditional (`transpose_own_loop`): XLA merges two transposes in a row back into the slow one.
    (768, 2048) bf16: 0.84 ms; (6144, 768): 2.3 ms.

    own_loop: the result always leaves a conditional, so no elementwise reader can fuse the
    transpose into its own loop (see `transpose_own_loop`).
    """
    r, c = a.shape
    p = r & -r
    if p == r or a.size < MIN_BLOCKED_TRANSPOSE:
        return transpose_own_loop(a, (1, 0)) if own_loop else _transpose(a)
    blocks = _transpose(a.reshape(r // p, p, c), (0, 2, 1))  # (q, C, p)
    return transpose_own_loop(blocks, (1, 0, 2)).reshape(c, r)


def transpose_own_loop(a: jax.Array, axes: tuple) -> jax.Array:
    """``a.transpose(axes)`` run as a loop of its own, reading a's buffer.

    XLA:CPU fuses a transpose with the elementwise ops producing or reading it into one
    loop, which then reads or writes across rows: 2048 x 2048 float32, (2 h)^T took 16-19 ms
    against 0.8 ms for 2 h and 2.4 ms for the transpose alone; a VA-VAE convolution's
    32 x 32 x 32 x 32 input, GroupNorm and swish before it, 2.2 ms inside the step against
    0.4 ms alone. An optimization barrier does not stop it (XLA removes barriers before it
    fuses); a conditional does. Both branches are the same transpose, so the predicate (a's
    first element) only hides that from XLA. The result leaves the conditional flattened, so
    it has one possible layout: a transposed one would move the transpose into the reader
    again."""
    def flat(v):
        return v.transpose(axes).reshape(-1)

    shape = tuple(a.shape[i] for i in axes)
    return jax.lax.cond(a.reshape(-1)[0] > 0, flat, flat, a).reshape(shape)


def _matmul_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a (M, N) . b (K, N)^T -> (M, K), in a's dtype, on one CPU device: one dot contracting
    both operands' last axes, which every CPU kernel takes as it comes (YNNPACK packs the
    transposed operand; in bf16 on an AVX512-BF16 CPU, g . w12^T, 2048 x 4096 x 768, took
    14.6 ms against 19.0 ms with the weight transposed first)."""
    return _dot(a, b, ((1,), (1,)))


def _matmul_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a (M, K)^T . b (M, N) -> (K, N), in a's dtype (the weight gradient), on one CPU device.

    Where a is the smaller operand, a is transposed first: the dot contracting both leading
    axes ran at half the rate even in float32 kernels (x^T . g for w12, 2048 x 768 by
    2048 x 4096: 142 ms against 72 ms + 2 ms for the transpose).

    Where a is the larger one (the SwiGLU output matmul: a (2048 x 2048) activation, a
    (2048 x 768) gradient), float32 kernels take the leading-axes contraction as it comes
    (an XLA dot, not a YNNPACK one). The alternative, b^T . a transposed back, leaves a
    (768 x 2048) -> (2048 x 768) transpose that XLA:CPU fuses into each AdamW update reading
    the gradient (~6 ms per layer at batch 8). Against it, the B/1 float32 step at batch 8
    on a Zen 5 takes 0.976x the time (median of 13 rounds alternating in one process; 0.965x
    in 3 pairs of separate processes), while transposing a first made it 1.07x slower. The
    16-bit kernels take only the row-major form (`_dot`), so there b and the result are
    transposed, the result in a loop of its own (`matrix_transpose(own_loop=True)`): fused
    into the AdamW updates and the gradient norm that read it, the transposed reads took
    0.17 s of a 2.45 s bf16 B/1 step on an Intel Xeon with AMX, and the step now takes 0.947x
    the time. Every transpose here is a `matrix_transpose` (see there for the row counts)."""
    m, k = a.shape
    n = b.shape[1]
    if m * k <= m * n + k * n:
        return _dot(matrix_transpose(a), b, ((1,), (0,)))
    if not _row_major_kernels(a.dtype):
        return _dot(a, b, ((0,), (0,)))
    return matrix_transpose(_dot(matrix_transpose(b), a, ((1,), (0,))), own_loop=True)


dense_matmul.defvjp(_dense_forward, _dense_backward)


@jax.custom_vjp
def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T) v on each of C independent chunks: (C, N, T, hd) in and out, N = images
    x heads per chunk (`attention_chunks`), q already scaled.

    Scores and softmax in float32 whatever the input dtype; the probabilities are saved for
    the backward (ds = p * (dp - rowsum(dp * p))). Every matmul is one batched dot in
    whichever form it comes (per B/1 layer at batch 8 on an AVX2 host, forward + backward
    70 ms against 88 ms with explicit transposes), except for the 16-bit kernels
    (`_row_major_kernels`), where the small (T, hd) operands are transposed, never a (T, T)
    one. The backward stacks the chunks' gradients: through JAX's rule for the chunk slices
    each gradient would be a zero-padded full-size array, summed chunk by chunk, which in
    bf16 XLA:CPU runs as one slow loop (85 ms per B/1 layer at batch 8 in 8 chunks on an
    AVX512-BF16 AMD EPYC, a third of the bf16 step; now 25 ms, 9 with `unstack`).
    """
    return _chunked_forward(q, k, v)[0]


def _swap(a: jax.Array) -> jax.Array:
    """(N, A, B) -> (N, B, A) as a row-major copy for the 16-bit kernels (see `_dot`); on one
    CPU device its input is pinned too (see `_transpose`)."""
    if one_cpu_device():
        return _transpose(a, (0, 2, 1))
    return materialise(a.transpose(0, 2, 1))


def materialise(a: jax.Array) -> jax.Array:
    """`a` as a row-major copy XLA can neither fold into its consumer nor give another
    layout: a barrier on the flattened array (one possible layout), then a free reshape.
    (XLA:CPU still fuses the copy into an elementwise consumer: no fusion barrier.)"""
    return jax.lax.optimization_barrier(a.reshape(-1)).reshape(a.shape)


def _bmm(a: jax.Array, b: jax.Array, out_dtype: Dtype | None = None) -> jax.Array:
    """(N, M, K) x (N, K, P) -> (N, M, P), float32 accumulation."""
    return _dot(a, b, ((2,), (1,)), ((0,), (0,)), out_dtype=out_dtype)


def _bmm_nt(a: jax.Array, b: jax.Array, out_dtype: Dtype | None = None) -> jax.Array:
    """(N, M, K) x (N, P, K)^T -> (N, M, P); b is a small (T, hd) operand."""
    if not _row_major_kernels(a.dtype):
        return _dot(a, b, ((2,), (2,)), ((0,), (0,)), out_dtype=out_dtype)
    return _bmm(a, _swap(b), out_dtype)


def _bmm_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """(N, K, M)^T x (N, K, P) -> (N, M, P); a is a (T, T) operand, so for the 16-bit kernels
    b and the result are transposed instead: (a^T b)^T = b^T a."""
    if not _row_major_kernels(a.dtype):
        return _dot(a, b, ((1,), (1,)), ((0,), (0,)))
    return _swap(_bmm(_swap(b), a))


def _attention_forward(q, k, v):
    scores = _bmm_nt(q, k, out_dtype=jnp.float32)  # (N, Tq, Tk)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return _bmm(probs, v), (q, k, v, probs)


def _attention_backward(residuals, g):
    q, k, v, probs = residuals
    g = g.astype(v.dtype)
    dv = _bmm_tn(probs, g)
    dprobs = _bmm_nt(g, v, out_dtype=jnp.float32)
    p32 = probs.astype(jnp.float32)
    dscores = (p32 * (dprobs - jnp.sum(dprobs * p32, axis=-1, keepdims=True))).astype(q.dtype)
    dq = _bmm(dscores, k)
    dk = _bmm_tn(dscores, q)
    return dq, dk, dv


def _chunked_forward(q, k, v):
    outs, residuals = zip(*(_attention_forward(q[i], k[i], v[i]) for i in range(q.shape[0])))
    return jnp.stack(outs), residuals


def _chunked_backward(residuals, g):
    grads = [_attention_backward(r, g[i]) for i, r in enumerate(residuals)]
    return tuple(jnp.stack(parts) for parts in zip(*grads))


chunked_attention.defvjp(_chunked_forward, _chunked_backward)

MAX_ATTENTION_CHUNKS = 8
MIN_CHUNK_SCORES = 2**18  # (images x heads x T x T) per call: 1 MB of float32 scores


def attention_chunks(batch: int, heads: int, tokens: int) -> int:
    """How many independent chunks (`chunked_attention`) the batch is split into: on one CPU
    device as many as divide the batch, up to `MAX_ATTENTION_CHUNKS`, while each call keeps at least
    `MIN_CHUNK_SCORES` score entries; elsewhere one.

    YNNPACK runs a batched dot on one thread (the B/1 q k^T at batch 8 takes the same 13 ms
    pinned to one core), so independent calls are what lets XLA's executor use the others;
    each call's scores also stay in cache. Per B/1 layer at batch 8 (12 heads x 256 x 256
    scores per image), forward + backward: 70 ms in one call, 60 ms in 8 (61-64 ms in 4, 16
    or 32). Small calls cost more than they gain: the demo's model (4 heads x 16 tokens,
    batch 64) trained 10% slower in 8 calls."""
    if not one_cpu_device():
        return 1  # the batch axis is the sharded one
    per_image = heads * tokens * tokens
    for chunks in range(min(batch, MAX_ATTENTION_CHUNKS), 1, -1):
        if batch % chunks == 0 and batch // chunks * per_image >= MIN_CHUNK_SCORES:
            return chunks
    return 1


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          implementation: str | None = None) -> jax.Array:
    """Scaled dot-product attention, (B, T, H, hd) in and out.

    implementation: None picks `chunked_attention` on CPU and ``jax.nn.dot_product_attention``
    with its default elsewhere (XLA's path in jax 0.10-0.11: jax does not pick cuDNN by
    itself); 'explicit' forces the former (in `attention_chunks` independent calls); 'xla' and
    'cudnn' (flash attention: bf16 / fp16 on CUDA GPUs) are passed to the latter.
    """
    if implementation is None:
        implementation = "explicit" if _on_cpu() else None
    if implementation != "explicit":
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    # 1/sqrt(hd) is folded into q (exact for power-of-two head sizes).
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    b, t, h, hd = q.shape
    chunks = attention_chunks(b, h, t)
    heads_major = lambda a: a.transpose(0, 2, 1, 3).reshape(chunks, b // chunks * h, t, hd)
    out = chunked_attention(heads_major(q), heads_major(k), heads_major(v))
    return out.reshape(b, h, t, hd).transpose(0, 2, 1, 3)
