"""Building blocks of the LDM autoencoder: convs and norms with torch's initialisation, the
resolution-level plan, ResNet / attention / resampling blocks and the mid block.

`vavae_jax.autoencoder` assembles them into the Encoder, Decoder and AutoencoderKL; the names
here follow upstream's module tree (see that module's docstring).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from vavae_jax.conv import conv_general_dilated, upsample_conv3x3
from vavae_jax.norm import GroupNorm

Dtype = Any

NUM_GROUPS = 32
NORM_EPS = 1e-6

CONV_KERNEL_AXES = (None, None, "conv_in", "conv_out")
ACT_AXES = ("act_batch", "act_height", "act_width", "act_channels")

# PyTorch's default Conv2d init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
# for the kernel, the same bound for the bias. Used so that training from scratch starts where
# upstream does; loading a checkpoint overwrites it anyway.
_torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int):
    bound = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _conv_initializers(fan_in: int):
    """(kernel_init, bias_init) of a torch-initialised, logically partitioned HWIO conv."""
    return (nn.with_logical_partitioning(_torch_kernel_init, CONV_KERNEL_AXES),
            nn.with_logical_partitioning(_torch_bias_init(fan_in), ("conv_out",)))


def conv(
    features: int,
    kernel_size: int,
    in_features: int,
    *,
    name: str,
    stride: int = 1,
    padding: Any = None,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nn.Conv:
    """A square `nn.Conv` with PyTorch-style init; padding defaults to k // 2 on every side.
    Its kernel gradient is `vavae_jax.conv`'s (faster on CPU; the forward is XLA's)."""
    if padding is None:
        padding = ((kernel_size // 2, kernel_size // 2),) * 2
    kernel_init, bias_init = _conv_initializers(in_features * kernel_size**2)
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        conv_general_dilated=conv_general_dilated,
        kernel_init=kernel_init,
        bias_init=bias_init,
        name=name,
    )


def group_norm(*, name: str, dtype: Dtype, param_dtype: Dtype, swish: bool = False) -> GroupNorm:
    """GroupNorm(32 groups, eps 1e-6, affine) with two-pass variance, like torch.nn.GroupNorm,
    then swish if asked. The statistics are float32 whatever `dtype` is; `dtype` only sets the
    dtype of the result (`vavae_jax.norm`)."""
    return GroupNorm(
        num_groups=NUM_GROUPS,
        epsilon=NORM_EPS,
        swish=swish,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def constrain_activations(x: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(x, ACT_AXES)


# ----------------------------------------------------------------------------------------------
# Layout of the resolution levels (shared with the converter)


@dataclasses.dataclass(frozen=True)
class LevelSpec:
    """One resolution level of the encoder or decoder.

    index: upstream level index (the `i` in `encoder.down.{i}` / `decoder.up.{i}`).
    in_channels: channels entering the first ResnetBlock (it gets a nin_shortcut if they differ
      from `channels`).
    channels: output channels of every ResnetBlock of the level (ch * ch_mult[i]).
    num_blocks: ResnetBlocks in the level (num_res_blocks, or num_res_blocks + 1 in the decoder).
    attention: an AttnBlock follows every ResnetBlock.
    resample: the level ends with a Downsample (encoder) or Upsample (decoder).
    """

    index: int
    in_channels: int
    channels: int
    num_blocks: int
    attention: bool
    resample: bool


def encoder_levels(
    ch: int,
    ch_mult: Sequence[int],
    num_res_blocks: int,
    attn_resolutions: Sequence[int],
    resolution: int,
) -> list[LevelSpec]:
    """Encoder levels in execution order (0, 1, ..., L-1)."""
    levels = []
    curr_res, block_in = resolution, ch
    for i, mult in enumerate(ch_mult):
        last = i == len(ch_mult) - 1
        attention = curr_res in attn_resolutions
        levels.append(LevelSpec(i, block_in, ch * mult, num_res_blocks, attention, not last))
        block_in = ch * mult
        if not last:
            curr_res //= 2
    return levels


def decoder_levels(
    ch: int,
    ch_mult: Sequence[int],
    num_res_blocks: int,
    attn_resolutions: Sequence[int],
    resolution: int,
) -> list[LevelSpec]:
    """Decoder levels in execution order (L-1, ..., 1, 0): lowest resolution first."""
    levels = []
    curr_res = resolution // 2 ** (len(ch_mult) - 1)
    block_in = ch * ch_mult[-1]
    for i in reversed(range(len(ch_mult))):
        attention = curr_res in attn_resolutions
        levels.append(
            LevelSpec(i, block_in, ch * ch_mult[i], num_res_blocks + 1, attention, i != 0)
        )
        block_in = ch * ch_mult[i]
        if i != 0:
            curr_res *= 2
    return levels


# ----------------------------------------------------------------------------------------------
# Building blocks


class ResnetBlock(nn.Module):
    """x + conv2(dropout(swish(norm2(conv1(swish(norm1(x))))))), with a 1x1 `nin_shortcut` on
    the skip path when the channel count changes. (B, H, W, Cin) -> (B, H, W, out_channels)."""

    out_channels: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c_in, c_out = x.shape[-1], self.out_channels
        h = group_norm(name="norm1", swish=True, **kw)(x)
        h = conv(c_out, 3, c_in, name="conv1", **kw)(h)
        h = group_norm(name="norm2", swish=True, **kw)(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv(c_out, 3, c_out, name="conv2", **kw)(h)
        if c_in != c_out:
            x = conv(c_out, 1, c_in, name="nin_shortcut", **kw)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions at full channel width C, scale C^-0.5,
    with 1x1-conv q/k/v/proj_out and a residual. (B, H, W, C) -> (B, H, W, C)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, c = x.shape
        h = group_norm(name="norm", **kw)(x)
        # Row-major flattening of (H, W), as torch's reshape(b, c, h * w) of an NCHW tensor.
        q = conv(c, 1, c, name="q", **kw)(h).reshape(b, height * width, c)
        k = conv(c, 1, c, name="k", **kw)(h).reshape(b, height * width, c)
        v = conv(c, 1, c, name="v", **kw)(h).reshape(b, height * width, c)
        logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32) * (c**-0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, height, width, c)
        return x + conv(c, 1, c, name="proj_out", **kw)(out)


class Downsample(nn.Module):
    """Zero-pad right/bottom by one pixel, then a 3x3 stride-2 VALID conv: (B, H, W, C) ->
    (B, H/2, W/2, C). (Upstream pads asymmetrically; SAME padding would pad top/left too.)"""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(
            c,
            3,
            c,
            name="conv",
            stride=2,
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (each pixel repeated 2x2), then a 3x3 conv: (B, H, W, C) ->
    (B, 2H, 2W, C). Computed as `vavae_jax.conv.upsample_conv3x3`, with the parameters of the
    `conv` layer it stands for."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return _UpsampleConv(x.shape[-1], name="conv", **kw)(x)


class _UpsampleConv(nn.Module):
    """`conv(features, 3, C)`'s kernel and bias, applied to the x2 upsampled input."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        kernel_init, bias_init = _conv_initializers(9 * c)
        kernel = self.param("kernel", kernel_init, (3, 3, c, self.features), self.param_dtype)
        bias = self.param("bias", bias_init, (self.features,), self.param_dtype)
        x, bias = nn.dtypes.promote_dtype(x, bias, dtype=self.dtype)
        return upsample_conv3x3(x, kernel) + bias  # the kernel's taps summed before its cast


def _resnet_block_cls(remat: bool):
    # `deterministic` (positional argument 2, counting self) must stay a Python bool under remat.
    return nn.remat(ResnetBlock, static_argnums=(2,)) if remat else ResnetBlock


class ResolutionLevel(nn.Module):
    """`num_blocks` x (ResnetBlock `block_j` [+ AttnBlock `attn_j`]), then an optional resampler
    (`downsample` or `upsample`, as `resample` says)."""

    channels: int
    num_blocks: int
    attention: bool
    resample: str | None  # None, "down" or "up"
    dropout: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_cls = _resnet_block_cls(self.remat)
        for j in range(self.num_blocks):
            x = block_cls(self.channels, dropout=self.dropout, name=f"block_{j}", **kw)(
                x, deterministic
            )
            if self.attention:
                x = AttnBlock(name=f"attn_{j}", **kw)(x)
        if self.resample == "down":
            x = Downsample(name="downsample", **kw)(x)
        elif self.resample == "up":
            x = Upsample(name="upsample", **kw)(x)
        return constrain_activations(x)


class MidBlock(nn.Module):
    """block_1 -> attn_1 -> block_2 at the lowest resolution; channels unchanged."""

    dropout: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_cls = _resnet_block_cls(self.remat)
        c = x.shape[-1]
        x = block_cls(c, dropout=self.dropout, name="block_1", **kw)(x, deterministic)
        x = AttnBlock(name="attn_1", **kw)(x)
        x = block_cls(c, dropout=self.dropout, name="block_2", **kw)(x, deterministic)
        return constrain_activations(x)
