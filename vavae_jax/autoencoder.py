"""VA-VAE tokenizer: the LDM KL-autoencoder (Encoder / Decoder / quant convs) in Flax Linen.

Activations are NHWC. Module and parameter names mirror the upstream PyTorch module tree so the
state-dict converter (`vavae_jax.convert`) reads as a renaming table:

    torch key                                  Flax path
    encoder.conv_in.weight                     encoder/conv_in/kernel
    encoder.down.0.block.1.norm1.weight        encoder/down_0/block_1/norm1/scale
    encoder.down.4.attn.0.q.weight             encoder/down_4/attn_0/q/kernel
    encoder.down.0.downsample.conv.weight      encoder/down_0/downsample/conv/kernel
    encoder.mid.attn_1.proj_out.bias           encoder/mid/attn_1/proj_out/bias
    decoder.up.3.block.0.nin_shortcut.weight   decoder/up_3/block_0/nin_shortcut/kernel
    decoder.up.4.upsample.conv.weight          decoder/up_4/upsample/conv/kernel
    quant_conv.weight / post_quant_conv.weight quant_conv/kernel, post_quant_conv/kernel
    linear_proj.weight                         linear_proj/kernel      (only with use_vf)

Every convolution (also the 1x1 ones) is an `nn.Conv`, so all kernels are (kh, kw, in, out).

Level `i` works at resolution `resolution / 2**i` (level 0 = full resolution). Whether a level has
attention is decided, as upstream, from the configured `resolution` and `attn_resolutions`, not from
the size of the input actually passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from vavae_jax.blocks import (
    MidBlock,
    ResolutionLevel,
    constrain_activations,
    conv,
    decoder_levels,
    encoder_levels,
    group_norm,
)
from vavae_jax.distributions import DiagonalGaussian

Dtype = Any


def decode_to_uint8(x: jax.Array) -> jax.Array:
    """Decoder output in ~[-1, 1], (B, H, W, 3) -> uint8 images (B, H, W, 3).

    Same arithmetic as upstream's `decode_to_images`: +128 (not +127.5), clip, then a truncating
    cast, so e.g. x = 0 maps to 128.
    """
    x = jnp.asarray(x, jnp.float32)
    return jnp.clip(127.5 * x + 128.0, 0.0, 255.0).astype(jnp.uint8)


# ----------------------------------------------------------------------------------------------
# Encoder / Decoder


class Encoder(nn.Module):
    """Image (B, H, W, Cin) -> moments (B, H/f, W/f, 2*z_channels if double_z else z_channels),
    f = 2**(len(ch_mult) - 1)."""

    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    resolution: int = 256
    z_channels: int = 32
    double_z: bool = True
    dropout: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True,
                 stage: str = "full") -> jax.Array:
        """stage 'body': stop before `conv_out` (after norm_out + swish); 'head': apply only
        `conv_out` to such features; 'full': both (see `AutoencoderKL.STAGES`)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out_channels = 2 * self.z_channels if self.double_z else self.z_channels
        if stage == "head":
            return conv(out_channels, 3, x.shape[-1], name="conv_out", **kw)(x)
        shared = dict(dropout=self.dropout, remat=self.remat, **kw)
        levels = encoder_levels(
            self.ch, self.ch_mult, self.num_res_blocks, self.attn_resolutions, self.resolution
        )
        h = conv(self.ch, 3, x.shape[-1], name="conv_in", **kw)(constrain_activations(x))
        for lv in levels:
            h = ResolutionLevel(
                channels=lv.channels,
                num_blocks=lv.num_blocks,
                attention=lv.attention,
                resample="down" if lv.resample else None,
                **shared,
                name=f"down_{lv.index}",
            )(h, deterministic)
        h = MidBlock(**shared, name="mid")(h, deterministic)
        h = group_norm(name="norm_out", swish=True, **kw)(h)
        if stage == "body" and not self.is_initializing():
            return h
        return conv(out_channels, 3, h.shape[-1], name="conv_out", **kw)(h)


class Decoder(nn.Module):
    """Latent (B, h, w, z_channels) -> image (B, h*f, w*f, out_ch), f = 2**(len(ch_mult) - 1).
    No output activation (values nominally in [-1, 1])."""

    ch: int = 128
    out_ch: int = 3
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    resolution: int = 256
    dropout: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, deterministic: bool = True,
                 stage: str = "full") -> jax.Array:
        """stage 'body' / 'head' / 'full': as in `Encoder`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if stage == "head":
            return conv(self.out_ch, 3, z.shape[-1], name="conv_out", **kw)(z)
        shared = dict(dropout=self.dropout, remat=self.remat, **kw)
        levels = decoder_levels(
            self.ch, self.ch_mult, self.num_res_blocks, self.attn_resolutions, self.resolution
        )
        z = constrain_activations(z)
        h = conv(levels[0].in_channels, 3, z.shape[-1], name="conv_in", **kw)(z)
        h = MidBlock(**shared, name="mid")(h, deterministic)
        for lv in levels:  # lowest resolution first; names keep the upstream level index
            h = ResolutionLevel(
                channels=lv.channels,
                num_blocks=lv.num_blocks,
                attention=lv.attention,
                resample="up" if lv.resample else None,
                **shared,
                name=f"up_{lv.index}",
            )(h, deterministic)
        h = group_norm(name="norm_out", swish=True, **kw)(h)
        if stage == "body" and not self.is_initializing():
            return h
        return conv(self.out_ch, 3, h.shape[-1], name="conv_out", **kw)(h)


# ----------------------------------------------------------------------------------------------
# Autoencoder


class AutoencoderKL(nn.Module):
    """VA-VAE: Encoder -> quant_conv -> DiagonalGaussian; z -> post_quant_conv -> Decoder.

    Defaults are the released f16d32 tokenizer (69,836,067 parameters): 256x256x3 images <->
    16x16x32 latents.

    Attributes:
      embed_dim: latent channels (the `d` in f16d32).
      double_z, z_channels, resolution, in_channels, out_ch, ch, ch_mult, num_res_blocks,
        attn_resolutions, dropout: the upstream `ddconfig`.
      use_vf: None, or the vision foundation model the latent is aligned to ('dinov2', 'mae'),
        or directly that model's feature width. When set, the model owns `linear_proj`
        (1x1 conv embed_dim -> vf_dim, no bias) used by `project_vf`.
      vf_feature_dim: feature width of a named foundation model (1024 for DINOv2 ViT-L/14).
      dtype: compute dtype (e.g. jnp.bfloat16). Norm statistics and the attention softmax stay
        in float32; posterior moments and decoded images are returned in float32.
      param_dtype: parameter dtype.
      remat: rematerialise every ResnetBlock in the backward pass (saves activation memory).
    """

    embed_dim: int = 32
    double_z: bool = True
    z_channels: int = 32
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.0
    use_vf: str | int | None = None
    vf_feature_dim: int = 1024
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @property
    def vf_dim(self) -> int:
        """Output width of `linear_proj`."""
        if isinstance(self.use_vf, int):
            return self.use_vf
        return self.vf_feature_dim

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shared = dict(
            ch=self.ch,
            ch_mult=self.ch_mult,
            num_res_blocks=self.num_res_blocks,
            attn_resolutions=self.attn_resolutions,
            resolution=self.resolution,
            dropout=self.dropout,
            remat=self.remat,
            **kw,
        )
        self.encoder = Encoder(z_channels=self.z_channels, double_z=self.double_z, **shared)
        self.decoder = Decoder(out_ch=self.out_ch, **shared)
        moments_in = 2 * self.z_channels if self.double_z else self.z_channels
        self.quant_conv = conv(2 * self.embed_dim, 1, moments_in, name="quant_conv", **kw)
        self.post_quant_conv = conv(
            self.z_channels, 1, self.embed_dim, name="post_quant_conv", **kw
        )
        if self.use_vf is not None:
            self.linear_proj = conv(
                self.vf_dim, 1, self.embed_dim, name="linear_proj", use_bias=False, **kw
            )

    def encode(self, x: jax.Array, deterministic: bool = True) -> DiagonalGaussian:
        """Images (B, H, W, in_channels) in [-1, 1] -> posterior over (B, H/f, W/f, embed_dim)."""
        moments = self.quant_conv(self.encoder(x, deterministic))
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
        """Latents (B, h, w, embed_dim) -> images (B, h*f, w*f, out_ch), float32."""
        h = self.decoder(self.post_quant_conv(z), deterministic)
        return h.astype(jnp.float32)

    # -- stages, for training steps that need gradients at the last convolutions ---------------
    # x -encoder_body-> h -encoder_head-> moments ~> z -decoder_body-> h' -decoder_head-> x_rec.
    # Each stage reads only its own part of the params (`split_stage_params`), so a step can
    # take a vjp per stage and pull cotangents back only as far as it needs.

    STAGES = ("encoder_body", "encoder_head", "decoder_body", "decoder_head", "vf_head")

    def encoder_body(self, x: jax.Array) -> jax.Array:
        """Images -> the input of the encoder's last conv (B, h, w, C)."""
        return self.encoder(x, stage="body")

    def encoder_head(self, h: jax.Array) -> jax.Array:
        """Encoder features -> posterior moments (B, h, w, 2 embed_dim), float32."""
        return self.quant_conv(self.encoder(h, stage="head")).astype(jnp.float32)

    def decoder_body(self, z: jax.Array) -> jax.Array:
        """Latents -> the input of the decoder's last conv (B, H, W, ch)."""
        return self.decoder(self.post_quant_conv(z), stage="body")

    def decoder_head(self, h: jax.Array) -> jax.Array:
        """Decoder features -> images, float32."""
        return self.decoder(h, stage="head").astype(jnp.float32)

    def vf_head(self, z: jax.Array) -> jax.Array:
        return self.project_vf(z)

    @staticmethod
    def split_stage_params(params) -> dict:
        """Params -> {stage: the params that stage reads} (inverse: `merge_stage_params`)."""
        encoder = {k: v for k, v in params["encoder"].items() if k != "conv_out"}
        decoder = {k: v for k, v in params["decoder"].items() if k != "conv_out"}
        stages = {
            "encoder_body": {"encoder": encoder},
            "encoder_head": {"encoder": {"conv_out": params["encoder"]["conv_out"]},
                             "quant_conv": params["quant_conv"]},
            "decoder_body": {"post_quant_conv": params["post_quant_conv"], "decoder": decoder},
            "decoder_head": {"decoder": {"conv_out": params["decoder"]["conv_out"]}},
        }
        if "linear_proj" in params:
            stages["vf_head"] = {"linear_proj": params["linear_proj"]}
        return stages

    @staticmethod
    def merge_stage_params(stages: dict) -> dict:
        """Stage trees (e.g. their gradients) -> one params-shaped tree."""
        merged = {
            "encoder": {**stages["encoder_body"]["encoder"],
                        **stages["encoder_head"]["encoder"]},
            "quant_conv": stages["encoder_head"]["quant_conv"],
            "post_quant_conv": stages["decoder_body"]["post_quant_conv"],
            "decoder": {**stages["decoder_body"]["decoder"],
                        **stages["decoder_head"]["decoder"]},
        }
        if "vf_head" in stages:
            merged["linear_proj"] = stages["vf_head"]["linear_proj"]
        return merged

    @staticmethod
    def last_conv_kernel(head_params) -> jax.Array:
        """The kernel of an `encoder_head` / `decoder_head` stage tree's last conv (the layer
        upstream's adaptive weights take gradient norms at)."""
        part = head_params["encoder"] if "encoder" in head_params else head_params["decoder"]
        return part["conv_out"]["kernel"]

    def project_vf(self, z: jax.Array) -> jax.Array:
        """`linear_proj`: latents (B, h, w, embed_dim) -> (B, h, w, vf_dim), for the VF loss."""
        if self.use_vf is None:
            raise ValueError("project_vf needs a model built with use_vf set")
        return self.linear_proj(z).astype(jnp.float32)

    def __call__(
        self,
        x: jax.Array,
        rng: jax.Array | None = None,
        sample_posterior: bool = True,
        deterministic: bool = True,
    ) -> tuple[jax.Array, DiagonalGaussian]:
        """Reconstruct x (B, H, W, in_channels): returns (reconstruction, posterior).

        The decoded latent is a posterior sample (noise from `rng`, or from the 'sample' RNG
        stream when rng is None) or, with sample_posterior=False, the posterior mean.
        deterministic=False enables dropout (needs a 'dropout' RNG; every released config uses
        dropout 0.0, where it is a no-op).
        """
        posterior = self.encode(x, deterministic)
        if sample_posterior:
            z = posterior.sample(self.make_rng("sample") if rng is None else rng)
        else:
            z = posterior.mode()
        if self.use_vf is not None and self.is_initializing():
            self.project_vf(z)  # `init` only runs __call__: create linear_proj's kernel too
        return self.decode(z, deterministic), posterior
