"""Frozen DINOv2 ViT feature extractor for the VA-VAE vision-foundation (VF) loss.

Upstream (vavae/ldm/models/foundation_models.py) runs timm's `vit_large_patch14_dinov2.lvd142m`
with `dynamic_img_size=True` under `torch.no_grad()`:

    x = F.interpolate(x, (224, 224), mode='bilinear', align_corners=False)   # x in [-1, 1]
    feats = model.forward_features(x)[:, 1:]                                 # final norm, no CLS
    feats.reshape(b, 16, 16, 1024)

`foundation_features` reproduces that for any latent grid (target size = 14 x grid). The ViT here
is `DinoV2`; `vavae_jax.dinov2_convert` loads timm / torch.hub / transformers weights into it.

Numerics that matter for bit-level agreement with upstream:
- The learned position table is stored for the pretraining grid (37 x 37 + CLS for the released
  weights) and resampled to the actual patch grid on every call, as timm does, with PyTorch's
  antialiased bicubic (Keys a = -0.5, PIL-style support widening when downsampling). Both the
  position resampling and the input resize are applied as constant (out, in) matrices computed in
  numpy, which match `torch.nn.functional.interpolate` to float32 rounding.
- LayerNorm eps 1e-6 with two-pass variance; exact (erf) GELU; softmax in float32.
- No ImageNet mean/std normalisation by default (upstream feeds [-1, 1] pixels).

Parameter tree (Flax names; shapes for ViT-L/14, D = 1024, H = 16 heads of 64):
    cls_token (1, 1, D)          pos_embed (1, 1 + 37*37, D)     register_tokens (1, R, D) if R > 0
    patch_embed/{kernel (14, 14, 3, D), bias (D,)}
    blocks_{i}/norm1/{scale, bias}                  blocks_{i}/ls1/gamma (D,)
    blocks_{i}/attn/qkv/{kernel (D, 3, H, 64), bias (3, H, 64)}
    blocks_{i}/attn/proj/{kernel (H, 64, D), bias (D,)}
    blocks_{i}/norm2/{scale, bias}                  blocks_{i}/ls2/gamma (D,)
    blocks_{i}/mlp/fc1/{kernel (D, F), bias}        blocks_{i}/mlp/fc2/{kernel (F', D), bias}
    norm/{scale, bias}
with F = F' = 4D for the GELU MLP and F = 2F', F' = 4096 for the SwiGLU FFN of ViT-g/14.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from dit_jax.ops import dot_product_attention
from vavae_jax.resample import (  # noqa: F401 (re-exported: the public names stay here)
    POS_INTERPOLATIONS,
    antialias_bicubic_matrix,
    bicubic_matrix,
    bilinear_matrix,
    pos_resize_matrices,
    resample_pos_embed,
)

Dtype = Any
HIGHEST = jax.lax.Precision.HIGHEST

# Official DINOv2 sizes (patch 14, head_dim 64). ViT-g/14 uses the SwiGLU FFN of the official
# `dinov2_vitg14` (ffn_layer="swiglufused"): w12 (D -> 2 x 4096), silu(first half) * second half,
# w3 (4096 -> D).
DINOV2_SIZES: dict[str, dict[str, Any]] = {
    "S": dict(embed_dim=384, depth=12, num_heads=6),
    "B": dict(embed_dim=768, depth=12, num_heads=12),
    "L": dict(embed_dim=1024, depth=24, num_heads=16),
    "g": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def _init(init, axes):
    return nn.with_logical_partitioning(init, axes)


_DENSE_INIT = nn.initializers.truncated_normal(0.02)
_ZEROS = nn.initializers.zeros_init()
_ONES = nn.initializers.ones_init()


def _layer_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    # eps 1e-6 as DINOv2; two-pass variance like torch.nn.LayerNorm.
    return nn.LayerNorm(
        epsilon=1e-6,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=_init(_ONES, ("norm",)),
        bias_init=_init(_ZEROS, ("norm",)),
        name=name,
    )


def _dense(features: int, axes: tuple[str, str], name: str, dtype, param_dtype) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_init(_DENSE_INIT, axes),
        bias_init=_init(_ZEROS, (axes[1],)),
        name=name,
    )


class QKVProjection(nn.Module):
    """(B, N, D) -> q, k, v, each (B, N, H, hd). Kernel (D, 3, H, hd): [q | k | v], head-major."""

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        shape = (3, self.num_heads, self.head_dim)
        kernel = self.param(
            "kernel",
            _init(_DENSE_INIT, ("embed", None, "heads", "kv")),
            (x.shape[-1],) + shape,
            self.param_dtype,
        )
        bias = self.param("bias", _init(_ZEROS, (None, "heads", "kv")), shape, self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        # token-major, x (B*N, D) @ kernel (D, 3*H*hd) as stored: with q / k / v leading
        # ("sbnhk") XLA:CPU transposed the ViT-L kernel on every call (24 x 7 ms per step)
        qkv = jnp.einsum("bnd,dshk->bnshk", x, kernel) + bias
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


class OutProjection(nn.Module):
    """(B, N, H, hd) -> (B, N, D). Kernel (H, hd, D)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            _init(_DENSE_INIT, ("heads", "kv", "embed")),
            x.shape[-2:] + (self.features,),
            self.param_dtype,
        )
        bias = self.param("bias", _init(_ZEROS, ("embed",)), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return jnp.einsum("bnhk,hkd->bnd", x, kernel) + bias


class Attention(nn.Module):
    """Multi-head self-attention, scale head_dim^-0.5, no mask. (B, N, D) -> (B, N, D)."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        head_dim = dim // self.num_heads
        q, k, v = QKVProjection(self.num_heads, head_dim, self.dtype, self.param_dtype, name="qkv")(
            x
        )
        # LightningDiT's attention: on CPU the explicit form (softmax in float32 whatever the
        # dtype; the scale folded into q, exact for DINOv2's 64-channel heads), elsewhere
        # jax.nn.dot_product_attention
        out = dot_product_attention(q, k, v)
        return OutProjection(dim, self.dtype, self.param_dtype, name="proj")(out)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2. (B, N, D) -> (B, N, D)."""

    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = _dense(self.hidden, ("embed", "mlp"), "fc1", self.dtype, self.param_dtype)(x)
        h = nn.gelu(h, approximate=False)
        return _dense(dim, ("mlp", "embed"), "fc2", self.dtype, self.param_dtype)(h)


class SwiGLU(nn.Module):
    """Official DINOv2 SwiGLU FFN: fc1 (D -> 2F), silu(first half) * second half, fc2 (F -> D).

    fc1 / fc2 are `w12` / `w3` in the official checkpoints, `fc1` / `fc2` in timm
    (SwiGLUPacked), `weights_in` / `weights_out` in transformers.
    """

    hidden: int  # F
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = _dense(2 * self.hidden, ("embed", "mlp"), "fc1", self.dtype, self.param_dtype)(x)
        gate, value = jnp.split(h, 2, axis=-1)
        h = nn.silu(gate) * value
        return _dense(dim, ("mlp", "embed"), "fc2", self.dtype, self.param_dtype)(h)


class LayerScale(nn.Module):
    """Per-channel residual-branch scale `gamma` (D,)."""

    init_value: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param(
            "gamma",
            _init(nn.initializers.constant(self.init_value), ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        return x * gamma.astype(x.dtype)


class Block(nn.Module):
    """Pre-norm block: x += ls1(attn(norm1(x))); x += ls2(ffn(norm2(x))). (B, N, D)."""

    num_heads: int
    ffn_hidden: int
    ffn: str = "mlp"
    layer_scale_init: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        h = _layer_norm("norm1", dt, pdt)(x)
        h = Attention(self.num_heads, dt, pdt, name="attn")(h)
        x = x + LayerScale(self.layer_scale_init, pdt, name="ls1")(h)
        h = _layer_norm("norm2", dt, pdt)(x)
        ffn_cls = SwiGLU if self.ffn == "swiglu" else Mlp
        h = ffn_cls(self.ffn_hidden, dt, pdt, name="mlp")(h)
        x = x + LayerScale(self.layer_scale_init, pdt, name="ls2")(h)
        return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))


def swiglu_hidden(embed_dim: int, mlp_ratio: float) -> int:
    """Official SwiGLUFFNFused width: 2/3 of the MLP width, rounded up to a multiple of 8."""
    return (int(int(embed_dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class DinoV2(nn.Module):
    """DINOv2 ViT (timm `vit_*_patch14_dinov2` / official `dinov2_vit*14[_reg]`).

    Call on preprocessed images (B, H, W, 3) (channels last); returns all tokens after the final
    LayerNorm, (B, 1 + R + h*w, D) with h = H // patch, w = W // patch: CLS, R register tokens,
    then patch tokens in row-major order. Pixels beyond a multiple of the patch size are ignored
    (as the strided conv in timm).
    """

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    patch_size: int = 14
    mlp_ratio: float = 4.0
    ffn: str = "mlp"  # "mlp" (GELU) or "swiglu" (ViT-g)
    num_register_tokens: int = 0
    pos_grid: int = 37  # grid of the stored position table (518 / 14 for released weights)
    pos_interpolation: str = "antialias"  # see POS_INTERPOLATIONS
    layer_scale_init: float = 1e-5
    dtype: Dtype = jnp.float32  # compute dtype
    param_dtype: Dtype = jnp.float32

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_register_tokens

    @property
    def ffn_hidden(self) -> int:
        if self.ffn == "swiglu":
            return swiglu_hidden(self.embed_dim, self.mlp_ratio)
        if self.ffn == "mlp":
            return int(self.embed_dim * self.mlp_ratio)
        raise ValueError(f"unknown ffn {self.ffn!r}; expected 'mlp' or 'swiglu'")

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        dim, p, dt, pdt = self.embed_dim, self.patch_size, self.dtype, self.param_dtype
        batch = images.shape[0]

        x = nn.Conv(
            dim,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=dt,
            param_dtype=pdt,
            kernel_init=_init(nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")),
            bias_init=_init(_ZEROS, ("embed",)),
            name="patch_embed",
        )(images)
        grid = x.shape[1:3]
        x = x.reshape(batch, grid[0] * grid[1], dim)

        cls_token = self.param(
            "cls_token",
            _init(nn.initializers.normal(1e-6), (None, None, "embed")),
            (1, 1, dim),
            pdt,
        )
        pos_embed = self.param(
            "pos_embed",
            _init(nn.initializers.truncated_normal(0.02), (None, None, "embed")),
            (1, 1 + self.pos_grid**2, dim),
            pdt,
        )
        pos_embed = resample_pos_embed(pos_embed, grid, self.pos_interpolation)

        cls = jnp.broadcast_to(cls_token, (batch, 1, dim))
        x = jnp.concatenate([cls.astype(x.dtype), x], axis=1)
        x = (x + pos_embed).astype(dt)
        if self.num_register_tokens:
            # Registers go right after CLS and get no position embedding.
            reg = self.param(
                "register_tokens",
                _init(nn.initializers.normal(1e-6), (None, None, "embed")),
                (1, self.num_register_tokens, dim),
                pdt,
            )
            reg = jnp.broadcast_to(reg, (batch, self.num_register_tokens, dim)).astype(dt)
            x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))

        for i in range(self.depth):
            x = Block(
                self.num_heads,
                self.ffn_hidden,
                self.ffn,
                self.layer_scale_init,
                dt,
                pdt,
                name=f"blocks_{i}",
            )(x)
        return _layer_norm("norm", dt, pdt)(x)


def dinov2_model(size: str = "L", **overrides) -> DinoV2:
    """`DinoV2` for an official size ('S', 'B', 'L', 'g'), with field overrides.

    `dinov2_model('L')` is the VA-VAE foundation model (timm vit_large_patch14_dinov2.lvd142m).
    """
    if size not in DINOV2_SIZES:
        raise ValueError(f"unknown DINOv2 size {size!r}; expected one of {list(DINOV2_SIZES)}")
    return DinoV2(**{**DINOV2_SIZES[size], **overrides})


# ----------------------------------------------------------------------------------------------
# Preprocessing and the VF-loss feature map
# ----------------------------------------------------------------------------------------------


def resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, H, W, C) -> (B, h, w, C), PyTorch bilinear, align_corners=False, no antialias."""
    if tuple(images.shape[1:3]) == tuple(size):
        return images.astype(jnp.float32)
    rows = bilinear_matrix(images.shape[1], size[0])
    cols = bilinear_matrix(images.shape[2], size[1])
    x = images.astype(jnp.float32)
    x = jnp.einsum("jw,bhwc->bhjc", cols, x, precision=HIGHEST)
    return jnp.einsum("ih,bhjc->bijc", rows, x, precision=HIGHEST)


def preprocess(
    images: jax.Array, size: tuple[int, int], *, imagenet_norm: bool = False
) -> jax.Array:
    """VA-VAE input in [-1, 1], (B, H, W, 3) -> DINOv2 input (B, size[0], size[1], 3) float32.

    Upstream only resizes (no normalisation). With `imagenet_norm`, pixels are mapped to [0, 1]
    and standardised with the ImageNet mean / std (what DINOv2 was trained with).
    """
    x = resize_bilinear(images, size)
    if imagenet_norm:
        mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
        std = jnp.asarray(IMAGENET_STD, jnp.float32)
        x = ((x + 1.0) * 0.5 - mean) / std
    return x


def foundation_features(
    model: DinoV2,
    params,
    images: jax.Array,
    latent_grid: int | tuple[int, int],
    *,
    imagenet_norm: bool = False,
) -> jax.Array:
    """DINOv2 patch features aligned with the VAE latent grid, as a constant (no gradient).

    Args:
      model: the `DinoV2` module.
      params: its parameters (the `params` collection, not wrapped in {'params': ...}).
      images: (B, H, W, 3) in [-1, 1] (the VAE encoder input).
      latent_grid: (h, w) of the latent (or an int for square); the images are resized to
        (patch * h, patch * w), e.g. 256 -> 224 for a 16 x 16 latent, 512 -> 448 for 32 x 32.
      imagenet_norm: apply ImageNet mean / std (upstream does not).

    Returns:
      (B, h, w, D) final-normed patch tokens (CLS and registers dropped), row-major, wrapped in
      `stop_gradient` like upstream's `torch.no_grad()`.
    """
    if isinstance(latent_grid, int):
        latent_grid = (latent_grid, latent_grid)
    h, w = latent_grid
    p = model.patch_size
    x = preprocess(images, (p * h, p * w), imagenet_norm=imagenet_norm).astype(model.dtype)
    tokens = model.apply({"params": params}, x)
    patches = tokens[:, model.num_prefix_tokens :]
    return jax.lax.stop_gradient(patches.reshape(images.shape[0], h, w, model.embed_dim))


def __getattr__(name: str):
    """The converter's functions (`params_from_torch`, ...) under this module's name: they live in
    `vavae_jax.dinov2_convert` (which imports this module), loaded on first use."""
    if name in ("torch_rules", "abstract_params", "params_from_torch", "params_to_torch",
                "detect_layout"):
        from vavae_jax import dinov2_convert

        return getattr(dinov2_convert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
