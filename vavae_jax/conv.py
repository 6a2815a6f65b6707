"""2-D convolution with a faster kernel gradient on one CPU device.

`conv_general_dilated` is a drop-in for ``lax.conv_general_dilated`` (what `nn.Conv` calls;
`blocks.conv` and the discriminator pass it in). The forward pass and the input gradient are
XLA's own, so values are unchanged; only the kernel gradient differs. XLA:CPU computes it as a
convolution that runs 2.5-6.5x slower than the forward one (measured on 2 AVX2 cores: 0.96-1.0 s
against 0.15 s for a 3x3, 128 -> 128 channel layer at 256x256). Here it is one matmul per
kernel tap instead:

    dkernel[i, j] = sum over (n, y, x) of  xpad[n, s*y + i, s*x + j, :]^T  g[n, y, x, :]

the taps a `lax.scan` so that one window copy exists at a time (0.22 s for that layer;
`python -m bench.conv_grad`). At stride 1 the input is transposed once and each tap reads it
at a shift (`_kernel_gradient_shifted_rows`); strided layers transpose the cotangent once.
When a kernel is frozen (the discriminator inside the generator step) its gradient is not
computed at all, and the same holds for inputs that need none (symbolic zeros).

Below `MIN_CHANNELS` input channels the kernel gradient of a large stride-1 layer is XLA's own
convolution, fed an input transposed in a loop of its own (`_kernel_gradient_as_convolution`).
Elsewhere (GPU / TPU, where cuDNN and XLA:TPU have good kernel-gradient convolutions; a sharded
CPU mesh, where flattening the batch would all-gather it; dilations, groups, layouts other
than NHWC / HWIO, or other layers with fewer than `MIN_CHANNELS` input channels) this is the
XLA op itself.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from dit_jax.ops import materialise, one_cpu_device, transpose_own_loop

NHWC = ("NHWC", "HWIO", "NHWC")
# Below this many input channels the kernel gradient is XLA's own convolution (for the RGB
# input layers the matmuls are no faster, and on the demo's 32 / 64-channel VA-VAE XLA's
# convolution is: (32, 32, 32, 32) -> 32 channels, 5.4 against 9.9 ms), given its input
# already transposed (`_kernel_gradient_as_convolution`) where the input has at least
# MIN_OWN_LOOP_INPUT elements; strided or smaller ones stay wholly XLA's (the f16d32 step's
# four small layers, 8-196k elements, measured 3% slower as a whole the other way).
MIN_CHANNELS = 128
MIN_OWN_LOOP_INPUT = 2**18


def _explicit_padding(padding, lhs_shape, rhs_shape, strides) -> tuple | None:
    """((lo, hi), (lo, hi)) for 'VALID' / 'SAME' / explicit pairs; None if unsupported."""
    if isinstance(padding, str):
        if padding.upper() not in ("VALID", "SAME"):
            return None
        pads = lax.padtype_to_pads(lhs_shape[1:3], rhs_shape[:2], strides, padding.upper())
        return tuple(tuple(p) for p in pads)
    pads = tuple(tuple(int(v) for v in p) for p in padding)
    return pads if len(pads) == 2 and all(len(p) == 2 for p in pads) else None


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
    """``lax.conv_general_dilated`` with `conv2d_nhwc`'s kernel gradient where it applies."""
    xla = functools.partial(
        lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
    if lhs.ndim != 4 or not one_cpu_device():
        return xla()
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers or NHWC)
    few_channels = lhs.shape[-1] < MIN_CHANNELS
    plain = (given == nhwc and feature_group_count == 1 and batch_group_count == 1
             and all(d == 1 for d in (lhs_dilation or (1, 1)))
             and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and preferred_element_type is None
             and (not few_channels or (all(s == 1 for s in window_strides)
                                       and lhs.size >= MIN_OWN_LOOP_INPUT)))
    pads = (_explicit_padding(padding, lhs.shape, rhs.shape, tuple(window_strides))
            if plain else None)
    if pads is None:
        return xla()
    kernel_gradient = "convolution" if few_channels else "matmuls"
    return conv2d_nhwc(lhs, rhs, tuple(int(s) for s in window_strides), pads, precision,
                       kernel_gradient)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv2d_nhwc(x: jax.Array, kernel: jax.Array, strides: tuple, pads: tuple,
                precision=None, kernel_gradient: str = "matmuls") -> jax.Array:
    """x (N, H, W, C) * kernel (kh, kw, C, D) -> (N, Ho, Wo, D): XLA's convolution; the
    kernel gradient by per-tap matmuls (module docstring), or with kernel_gradient=
    'convolution' (stride 1 only) XLA's own on a pre-transposed input
    (`_kernel_gradient_as_convolution`)."""
    _check_kernel_gradient(kernel_gradient, strides)
    return _xla_conv(x, kernel, strides, pads, precision)


def _check_kernel_gradient(kernel_gradient: str, strides: tuple) -> None:
    if kernel_gradient not in ("matmuls", "convolution"):
        raise ValueError(f"kernel_gradient={kernel_gradient!r}: 'matmuls' or 'convolution'")
    if kernel_gradient == "convolution" and strides != (1, 1):
        raise ValueError(f"kernel_gradient='convolution' is for stride 1, got {strides}")


def _xla_conv(x, kernel, strides, pads, precision):
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=NHWC,
                                    precision=precision)


def _forward(x, kernel, strides, pads, precision, kernel_gradient):
    _check_kernel_gradient(kernel_gradient, strides)
    y = _xla_conv(x.value, kernel.value, strides, pads, precision)
    return y, (x.value, kernel.value, x.perturbed, kernel.perturbed)


def _backward(strides, pads, precision, kernel_gradient, residuals, g):
    x, kernel, need_dx, need_dkernel = residuals
    dx = dkernel = None
    if need_dx and (strides == (1, 1) or min(min(p) for p in pads) < 0):  # XLA's own
        _, vjp = jax.vjp(lambda a: _xla_conv(a, kernel, strides, pads, precision), x)
        (dx,) = vjp(g)
    elif need_dx:
        dx = _input_gradient_strided(g, kernel, x.shape, strides, pads, precision)
    if need_dkernel and kernel_gradient == "convolution":
        dkernel = _kernel_gradient_as_convolution(x, g, pads, precision).astype(kernel.dtype)
    elif need_dkernel:
        dkernel = _kernel_gradient(x, g, kernel.shape, strides, pads, precision)
        dkernel = dkernel.astype(kernel.dtype)
    return dx, dkernel


def _input_gradient_strided(g, kernel, x_shape, strides, pads, precision):
    """dx of a strided convolution as one stride-1 convolution of g per input phase.

    XLA computes it as a convolution of g dilated with zeros (stride - 1 between values), which
    multiplies the zeros too: on 2 Zen 5 cores the f16d32 encoder's first downsample (257x257
    -> 128x128 at 128 channels) took 0.17 s against 0.01 s forward. Along one axis, padded
    input position p = s * a + r receives g[a - t] . kernel[r + s * t]^T for every tap
    r + s * t of the kernel, so phase r is a correlation of g (padded by its tap count - 1 in
    front) with those taps reversed; the phases interleave back into the padded input."""
    c = kernel.shape[2]
    _, ho, wo, _ = g.shape
    padded = [x_shape[1] + sum(pads[0]), x_shape[2] + sum(pads[1])]
    # positions of phase r along each axis (phase 0 has the most)
    sizes = [[-(-(n - r) // s) for r in range(s)] for n, s in zip(padded, strides)]
    steps = [sizes[0][0], sizes[1][0]]
    phases = []
    for r, a_r in enumerate(sizes[0]):
        row = []
        for q, a_q in enumerate(sizes[1]):
            taps = kernel[r::strides[0], q::strides[1]][::-1, ::-1]  # (tr, tq, C, D)
            tr, tq = taps.shape[:2]
            if tr == 0 or tq == 0:
                phase = jnp.zeros((g.shape[0], a_r, a_q, c), g.dtype)
            else:
                g_pad = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (tr - 1, a_r - ho, 0),
                                                            (tq - 1, a_q - wo, 0), (0, 0, 0)))
                phase = lax.conv_general_dilated(g_pad, jnp.swapaxes(taps, 2, 3), (1, 1),
                                                 "VALID", dimension_numbers=NHWC,
                                                 precision=precision)
            row.append(jnp.pad(phase, ((0, 0), (0, steps[0] - a_r), (0, steps[1] - a_q),
                                       (0, 0))))
        phases.append(jnp.stack(row, axis=3))  # (N, A, A', sq, C)
    dx_padded = jnp.stack(phases, axis=2).reshape(
        g.shape[0], strides[0] * steps[0], strides[1] * steps[1], c)
    (top, _), (left, _) = pads
    return dx_padded[:, top:top + x_shape[1], left:left + x_shape[2]]


def _kernel_gradient_as_convolution(x, g, pads, precision):
    """XLA's own kernel gradient of a stride-1 convolution (the same convolution, the same
    values): the correlation of x, as (C, H, W, N) with the channels as the batch and the
    images as the features, with g as a (Ho, Wo, N, D) kernel, giving (C, kh, kw, D).

    XLA:CPU lays x out that way with a transpose it fuses with the ops producing x (the
    GroupNorm and swish before each of the demo's convolutions), recomputing them in the
    transposed order: 2.2 ms per (32, 32, 32, 32) input inside the step, 0.4 ms alone. Here
    the transpose is a loop of its own (`transpose_own_loop`) that reads x's buffer."""
    x_t = transpose_own_loop(x, (3, 1, 2, 0))
    g_t = g.transpose(1, 2, 0, 3)
    dkernel = lax.conv_general_dilated(x_t, g_t, (1, 1), pads, dimension_numbers=NHWC,
                                       precision=precision)  # (C, kh, kw, D)
    return dkernel.transpose(1, 2, 0, 3)


def _kernel_gradient(x, g, kernel_shape: Sequence[int], strides, pads, precision):
    """sum over (n, y, x) of the tap's input window^T . g, accumulated in float32. Stride 1
    goes to the two forms below; strided layers run one (D, M) @ (M, C) matmul per tap (the
    canonical row-major form XLA:CPU runs fastest) and transpose the stacked result."""
    kh, kw, c, d = kernel_shape
    if strides == (1, 1) and kh * kw * d <= c:
        return _kernel_gradient_few_outputs(x, g, kernel_shape, pads, precision)
    if strides == (1, 1):
        return _kernel_gradient_shifted_rows(x, g, kernel_shape, pads, precision)
    _, ho, wo, _ = g.shape
    (sh, sw), m = strides, g.shape[0] * ho * wo
    xpad = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    # one transpose of the cotangent, shared by every tap; the barrier keeps it materialised
    g_t = lax.optimization_barrier(g.reshape(m, d).T)
    accumulate = jnp.promote_types(x.dtype, jnp.float32)
    span = (xpad.shape[0], sh * (ho - 1) + 1, sw * (wo - 1) + 1, c)

    def tap(_, ij):
        # a loop, so that only one window copy exists at a time (unrolled, XLA would make
        # every layer's windows up front: 9x the activations)
        window = lax.dynamic_slice(xpad, (0, ij[0], ij[1], 0), span)[:, ::sh, ::sw]
        return None, jnp.dot(g_t, window.reshape(m, c), precision=precision,
                             preferred_element_type=accumulate)  # (D, C)

    offsets = jnp.array([(i, j) for i in range(kh) for j in range(kw)], jnp.int32)
    _, taps = lax.scan(tap, None, offsets)
    return taps.reshape(kh, kw, d, c).transpose(0, 1, 3, 2)


def _kernel_gradient_shifted_rows(x, g, kernel_shape, pads, precision):
    """The same sum for stride 1, with each tap's (C, D) block computed as the kernel lays it
    out. (D, C) blocks need a transpose at the end, and XLA:CPU fuses that into the
    optimizer's update, re-reading every gradient across its rows once per use: about 0.25 s
    of a 6 s f16d32 step.

    The padded input, flattened to (N * Hp * Wp, C) rows, is transposed once; output row r's
    input for tap (i, j) is then its column r + i * Wp + j. With the cotangent zero-padded to
    the same rows, dkernel[i, j] = x_t[:, shift: shift + rows] @ g_rows, (C, rows) @ (rows, D),
    one matmul per tap in a `lax.scan` (the padding rows add (Hp * Wp) / (H * W) - 1 of the
    multiply-adds: 3% at 64x64, 27% at 16x16)."""
    kh, kw, c, d = kernel_shape
    n, hp, wp = x.shape[0], x.shape[1] + sum(pads[0]), x.shape[2] + sum(pads[1])
    _, ho, wo, _ = g.shape
    rows, max_shift = n * hp * wp, (kh - 1) * wp + (kw - 1)
    x_rows = jnp.pad(x, ((0, 0), *pads, (0, 0))).reshape(rows, c)
    x_t = jnp.pad(x_rows, ((0, max_shift), (0, 0))).T  # (C, rows + max_shift)
    if kh * kw == 1 and jnp.dtype(x.dtype).itemsize < 4:
        # XLA:CPU's 16-bit dots take only row-major operands. With a single tap XLA folded
        # this transpose into the dot, which then went to a kernel without bf16 x bf16 ->
        # float32 ("Unsupported element type for DotThunk"); `materialise` keeps x_t as
        # computed here. Not with more taps: there it made the 3x3 bf16 kernel gradient 1.56x
        # slower (256x256, 128 channels) and the loop keeps x_t anyway.
        x_t = materialise(x_t)
    g_rows = jnp.pad(g, ((0, 0), (0, hp - ho), (0, wp - wo), (0, 0))).reshape(rows, d)
    accumulate = jnp.promote_types(x.dtype, jnp.float32)

    def tap(_, shift):
        window = lax.dynamic_slice(x_t, (0, shift), (c, rows))
        return None, jnp.dot(window, g_rows, precision=precision,
                             preferred_element_type=accumulate)  # (C, D)

    shifts = jnp.array([i * wp + j for i in range(kh) for j in range(kw)], jnp.int32)
    _, taps = lax.scan(tap, None, shifts)
    return taps.reshape(kh, kw, c, d)


def _kernel_gradient_few_outputs(x, g, kernel_shape, pads, precision):
    """The same sum for stride 1 and few output channels (the decoder's RGB conv_out), where
    copying nine input windows costs more than the matmuls: the padded input, flattened to
    (N * Hp * Wp, C) rows, is used once as it is, and the small cotangent is shifted instead.

    Padded to (N, Hp, Wp, D) with zeros, input row r + i * Wp + j is tap (i, j)'s input for
    output row r, so dkernel[i, j]^T = shift(g^T, i * Wp + j) @ x_rows, one
    (kh * kw * D, rows) @ (rows, C) matmul for all taps."""
    kh, kw, c, d = kernel_shape
    n, hp, wp = x.shape[0], x.shape[1] + sum(pads[0]), x.shape[2] + sum(pads[1])
    _, ho, wo, _ = g.shape
    rows, max_shift = n * hp * wp, (kh - 1) * wp + (kw - 1)
    x_rows = jnp.pad(x, ((0, 0), *pads, (0, 0))).reshape(rows, c)
    x_rows = jnp.pad(x_rows, ((0, max_shift), (0, 0)))  # the last taps read past the end
    g_t = jnp.pad(g, ((0, 0), (0, hp - ho), (0, wp - wo), (0, 0))).reshape(rows, d).T
    shifted = [jnp.pad(g_t, ((0, 0), (i * wp + j, max_shift - i * wp - j)))
               for i in range(kh) for j in range(kw)]
    accumulate = jnp.promote_types(x.dtype, jnp.float32)
    dkernel_t = jnp.dot(jnp.concatenate(shifted), x_rows, precision=precision,
                        preferred_element_type=accumulate)  # (kh * kw * D, C)
    return dkernel_t.reshape(kh, kw, d, c).transpose(0, 1, 3, 2)


conv2d_nhwc.defvjp(_forward, _backward, symbolic_zeros=True)


# ----------------------------------------------------------------------------------------------
# Nearest-neighbour x2 upsampling followed by a 3x3 convolution, without the upsampled input

# Below this many low-resolution positions (batch x H x W) the direct form is kept: one image
# of 16x16 -> 32x32 at 512 channels ran its forward in 23 against 11 ms direct on a Zen 5 (on
# an Intel Xeon with AMX in 9 against 15 ms, forward + backward level). From two images up the
# phase form was faster on that Xeon in every case measured, forward + backward: 16x16 at 512
# channels, batch 2 61 against 82 ms, batch 8 162 against 319 ms; the demo's 64-channel
# layers at batch 32, 16x16 12 against 36 ms and 8x8 3.0 against 8.0 ms.
MIN_PHASE_POSITIONS = 512


def upsample_conv3x3(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
    """conv3x3(nearest_upsample_x2(x), kernel) with padding 1: x (B, H, W, C), kernel (3, 3, C,
    D) -> (B, 2H, 2W, D).

    Each of the four output phases (row parity p, column parity q) sees every low-resolution
    pixel through a 2x2 kernel whose taps are sums of the 3x3 kernel's, so the layer is four
    2x2 convolutions of x: 16 / 36 of the multiply-adds, and no 4x larger upsampled input or
    gradient (on 2 Zen 5 cores, 128 -> 256 at 128 channels: forward 50 -> 27 ms, forward and
    backward 145 -> 60 ms). The sums of kernel taps round differently from upstream's nine
    products (1e-6 relative). Small inputs (`MIN_PHASE_POSITIONS`, counted over the batch)
    take the direct form.
    The kernel's taps are summed in its own dtype, then cast to x's.
    """
    b, h, w, _ = x.shape
    if b * h * w < MIN_PHASE_POSITIONS:
        up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv_general_dilated(up, kernel.astype(x.dtype), (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=NHWC, precision=precision)
    rows = []
    for p in range(2):
        rows_kernel = _merge_taps(kernel, p, axis=0)
        cols = [conv_general_dilated(x, _merge_taps(rows_kernel, q, axis=1).astype(x.dtype),
                                     (1, 1), ((1 - p, p), (1 - q, q)), dimension_numbers=NHWC,
                                     precision=precision)
                for q in range(2)]
        rows.append(jnp.stack(cols, axis=3))  # (B, H, W, 2, D)
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, kernel.shape[-1])


def _merge_taps(kernel: jax.Array, phase: int, axis: int) -> jax.Array:
    """The 3 taps of `kernel` along `axis` as the 2 that output phase `phase` applies to
    low-resolution pixels (i - 1, i) for phase 0 or (i, i + 1) for phase 1: upsampled pixel
    2i + phase reads upsampled pixels 2i + phase - 1 .. 2i + phase + 1, which repeat
    low-resolution pixels (i - 1, i, i) for phase 0 and (i, i, i + 1) for phase 1."""
    t0, t1, t2 = (lax.index_in_dim(kernel, i, axis) for i in range(3))
    merged = (t0, t1 + t2) if phase == 0 else (t0 + t1, t2)
    return jnp.concatenate(merged, axis=axis)
