"""vavae_jax.conv: XLA's convolution with a per-tap matmul kernel gradient on one CPU device
(XLA's own kernel gradient on a pre-transposed input below MIN_CHANNELS)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from vavae_jax import conv as conv_module
from vavae_jax.conv import conv_general_dilated

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(autouse=True)
def small_layers_use_the_matmul_gradient(monkeypatch):
    """The layers here are small: lower the channel threshold so they take the new path."""
    monkeypatch.setattr(conv_module, "MIN_CHANNELS", 16)

# the autoencoder's 3x3 and 1x1 convolutions, its stride-2 downsample (pad right / bottom
# only), the discriminator's 4x4 ones, and other strides for the per-phase input gradient
LAYERS = [
    (3, 1, ((1, 1), (1, 1)), 32, 48),
    (3, 1, ((1, 1), (1, 1)), 32, 3),  # few outputs: the shifted-cotangent form
    (1, 1, ((0, 0), (0, 0)), 32, 16),
    (3, 2, ((0, 1), (0, 1)), 32, 32),
    (4, 2, ((1, 1), (1, 1)), 16, 32),
    (4, 1, ((1, 1), (1, 1)), 64, 1),
    (3, 1, "SAME", 16, 8),
    (1, 2, ((0, 0), (0, 0)), 32, 16),  # a phase with no taps
    (3, 3, ((1, 2), (2, 0)), 16, 24),
]


def squared_output(conv, stride, pads):
    return lambda x, w: (conv(x, w, (stride, stride), pads, dimension_numbers=NHWC) ** 2).sum()


def operands(k, c, d, dtype=jnp.float32, size=12):
    kx, kw = jax.random.split(jax.random.PRNGKey(k * 100 + c + d))
    x = jax.random.normal(kx, (2, size, size + 2, c), dtype)
    w = (jax.random.normal(kw, (k, k, c, d)) / np.sqrt(k * k * c)).astype(dtype)
    return x, w


@pytest.mark.parametrize("k, stride, pads, c, d", LAYERS)
def test_value_and_gradients_equal_xla(k, stride, pads, c, d):
    x, w = operands(k, c, d)
    ours, xla = squared_output(conv_general_dilated, stride, pads), squared_output(
        lax.conv_general_dilated, stride, pads)
    assert float(jax.jit(ours)(x, w)) == float(jax.jit(xla)(x, w))  # the same forward op
    got = jax.jit(jax.grad(ours, (0, 1)))(x, w)
    want = jax.jit(jax.grad(xla, (0, 1)))(x, w)
    if stride == 1:
        np.testing.assert_array_equal(got[0], want[0])  # XLA's own input gradient
    else:  # one convolution per phase: the same products, summed in another order
        np.testing.assert_allclose(got[0], want[0], rtol=2e-5, atol=2e-5 * float(
            jnp.abs(want[0]).max()))
    np.testing.assert_allclose(got[1], want[1], rtol=2e-5, atol=2e-5 * float(
        jnp.abs(want[1]).max()))


def hlo_of_grad(fn, argnum, *args):
    return jax.jit(jax.grad(fn, argnum)).lower(*args).as_text()


def test_only_the_needed_gradients_are_computed():
    """A frozen kernel (LPIPS, the discriminator in the generator step) costs no kernel
    gradient, and an input that needs no gradient no transposed convolution."""
    x, w = operands(3, 32, 32)
    fn = squared_output(conv_general_dilated, 1, ((1, 1), (1, 1)))
    dx_only, dw_only = hlo_of_grad(fn, 0, x, w), hlo_of_grad(fn, 1, x, w)
    assert "dot_general" not in dx_only and dx_only.count("convolution(") == 2
    assert "dot_general" in dw_only and dw_only.count("convolution(") == 1


@pytest.mark.parametrize("k, stride, pads, c, d", [
    (3, 1, ((1, 1), (1, 1)), 8, 12), (1, 1, ((0, 0), (0, 0)), 8, 4), (3, 1, "SAME", 3, 8),
    (3, 2, ((0, 1), (0, 1)), 8, 8)])
@pytest.mark.parametrize("own_loop", [True, False])
def test_few_channels_keep_xla_s_kernel_gradient_convolution(k, stride, pads, c, d, own_loop,
                                                             monkeypatch):
    """Below MIN_CHANNELS the kernel gradient is XLA's own convolution, bit for bit; at stride 1
    an input of MIN_OWN_LOOP_INPUT elements or more is transposed in a loop of its own (a
    conditional); strided layers and smaller inputs are XLA's op."""
    assert c < conv_module.MIN_CHANNELS
    monkeypatch.setattr(conv_module, "MIN_OWN_LOOP_INPUT", 0 if own_loop else 10**9)
    x, w = operands(k, c, d)
    ours, xla = squared_output(conv_general_dilated, stride, pads), squared_output(
        lax.conv_general_dilated, stride, pads)
    got = jax.jit(jax.grad(ours, (0, 1)))(x, w)
    want = jax.jit(jax.grad(xla, (0, 1)))(x, w)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    compiled = jax.jit(jax.grad(ours, 1)).lower(x, w).compile().as_text()
    assert " while(" not in compiled  # no per-tap matmuls (a 1x1 one XLA makes a dot itself)
    assert (" conditional(" in compiled) == (stride == 1 and own_loop)


def test_kernel_gradient_choice_is_checked():
    x, w = operands(3, 8, 8)
    for strides, choice in (((2, 2), "convolution"), ((1, 1), "taps")):
        with pytest.raises(ValueError, match="kernel_gradient"):
            jax.grad(lambda w, s=strides, c=choice: conv_module.conv2d_nhwc(
                x, w, s, ((1, 1), (1, 1)), None, c).sum())(w)
    # called directly (bench.conv_grad), a strided small layer keeps the per-tap matmuls
    got = jax.grad(lambda w: (conv_module.conv2d_nhwc(x, w, (2, 2), ((1, 1), (1, 1))) ** 2
                              ).sum())(w)
    want = jax.grad(lambda w: (lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)),
                                                        dimension_numbers=NHWC) ** 2).sum())(w)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))


def test_falls_back_to_xla_where_it_does_not_apply():
    few = conv_module.MIN_CHANNELS - 1
    x, w = operands(3, few, 8)
    fn = squared_output(conv_general_dilated, 1, ((1, 1), (1, 1)))
    assert "dot_general" not in hlo_of_grad(fn, 1, x, w)  # the RGB input layers: a convolution
    x, w = operands(3, 32, 8)
    dilated = lambda x, w: (conv_general_dilated(  # noqa: E731
        x, w, (1, 1), ((2, 2), (2, 2)), rhs_dilation=(2, 2), dimension_numbers=NHWC) ** 2).sum()
    assert "dot_general" not in hlo_of_grad(dilated, 1, x, w)
    # a sharded mesh keeps XLA's op (flattening the batch would gather it)
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    with jax.set_mesh(mesh):
        assert "dot_general" not in hlo_of_grad(fn, 1, x, w)


def test_kernel_gradient_keeps_memory_of_xla():
    """The per-tap windows exist one at a time: a stack of layers needs about the temporary
    memory of XLA's own gradient (unrolled, every layer's nine windows were made at once)."""
    def loss(conv):
        def f(kernels, x):
            for kernel in kernels:
                x = jax.nn.silu(conv(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=NHWC))
            return (x ** 2).sum()
        return f

    kernels, x = [jnp.zeros((3, 3, 32, 32))] * 6, jnp.zeros((1, 64, 64, 32))
    temp = {name: jax.jit(jax.grad(loss(conv))).lower(kernels, x).compile().memory_analysis()
            .temp_size_in_bytes for name, conv in (("xla", lax.conv_general_dilated),
                                                   ("ours", conv_general_dilated))}
    activation = x.size * x.dtype.itemsize
    assert temp["ours"] <= temp["xla"] + 2 * activation, (temp, activation)


# a 1x1 layer with more outputs than inputs (the encoder's nin_shortcuts) has a single tap,
# whose transposed input XLA folded into a dot its CPU runtime has no bf16 kernel for
@pytest.mark.parametrize("k, c, d", [(3, 32, 16), (1, 32, 48)])
def test_bfloat16_kernel_gradient(k, c, d):
    x, w = operands(k, c, d, jnp.bfloat16)
    pads = ((k // 2, k // 2),) * 2
    fn = squared_output(conv_general_dilated, 1, pads)
    # x an argument, as in a model: a constant x would have its transpose folded at compile time
    got = jax.jit(jax.grad(lambda x, w: fn(x, w).astype(jnp.float32), 1))(x, w)
    want = jax.grad(squared_output(lax.conv_general_dilated, 1, pads), 1)(
        x.astype(jnp.float32), w.astype(jnp.float32))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.05,
                               atol=0.02 * float(jnp.abs(want).max()))


def upsample_then_conv(x, w):
    """What upstream computes: interpolate(scale_factor=2, mode='nearest'), then the conv."""
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return lax.conv_general_dilated(up, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)


@pytest.mark.parametrize("size, phases", [(32, True), (16, True), (8, False)])
def test_upsample_conv3x3_equals_upsampling_first(size, phases):
    # two 32x32 or 16x16 inputs take the four 2x2 phase convolutions, two 8x8 ones the direct
    # form (the threshold counts positions over the batch)
    x, w = operands(3, 16, 24, size=size)
    assert (x.shape[0] * x.shape[1] * x.shape[2] >= conv_module.MIN_PHASE_POSITIONS) == phases
    g = jax.random.normal(jax.random.PRNGKey(7), (2, 2 * size, 2 * size + 4, 24))
    ours = jax.jit(lambda x, w: jax.vjp(conv_module.upsample_conv3x3, x, w))
    want, want_vjp = jax.vjp(upsample_then_conv, x, w)
    got, got_vjp = jax.vjp(conv_module.upsample_conv3x3, x, w)
    assert got.shape == want.shape == (2, 2 * size, 2 * size + 4, 24)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_vjp(g), want_vjp(g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5 * float(jnp.abs(b).max()))
    hlo = ours.lower(x, w).as_text()
    # the phase form convolves the low-resolution input only, with 2x2 kernels
    assert ("x2x16x24xf32" in hlo) == phases
    assert (f"2x{2 * size}x{2 * size + 4}x16xf32" in hlo) != phases  # no upsampled input


def test_upsample_conv3x3_bfloat16_sums_taps_in_the_kernel_dtype():
    x, w = operands(3, 16, 8, size=32)
    got = conv_module.upsample_conv3x3(x.astype(jnp.bfloat16), w)  # float32 kernel
    assert got.dtype == jnp.bfloat16
    want = upsample_then_conv(x.astype(jnp.bfloat16).astype(jnp.float32), w)
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=2e-2, atol=2e-2)
