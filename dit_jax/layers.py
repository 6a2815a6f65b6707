"""Building blocks of LightningDiT (NHWC / token-major, Linen).

Every parameter carries logical axis names (see `launch/sharding.py`); matmuls run in `dtype`
while parameters are stored in `param_dtype`. Kernels whose PyTorch weight is a concatenation of
equal chunks (qkv, SwiGLU w12, adaLN) are stored with the chunk as its own axis, e.g. qkv as
(D, 3, heads, head_dim): tensor parallelism then splits heads, never the q|k|v boundary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from dit_jax.ops import dense_matmul, dot_product_attention, unstack

Dtype = jnp.dtype
Initializer = Callable[..., jax.Array]


def xavier_uniform(in_ndim: int, out_ndim: int) -> Initializer:
    """Xavier/Glorot uniform for a kernel of shape (*in_dims, *out_dims), as torch's
    ``xavier_uniform_`` on the equivalent (prod(out), prod(in)) matrix."""
    return nn.initializers.xavier_uniform(
        in_axis=tuple(range(in_ndim)), out_axis=tuple(range(in_ndim, in_ndim + out_ndim))
    )


class Dense(nn.Module):
    """``y = x @ kernel + bias`` contracting the last `in_ndim` axes of x.

    kernel: (*x.shape[-in_ndim:], *features) with logical names `kernel_axes`;
    bias: (*features,) with names ``kernel_axes[in_ndim:]``.
    """

    features: Sequence[int]
    kernel_axes: Sequence[str | None]
    in_ndim: int = 1
    use_bias: bool = True
    kernel_init: Initializer | None = None  # default: xavier uniform (upstream `_basic_init`)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = tuple(self.features)
        in_shape = x.shape[-self.in_ndim :]
        init = self.kernel_init or xavier_uniform(self.in_ndim, len(features))
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init, tuple(self.kernel_axes)),
            (*in_shape, *features),
            self.param_dtype,
        )
        # float32 accumulator (for 16-bit dtypes) + bias, rounded once, as torch autocast's
        # Linear; the bias gradient then reduces in float32.
        y = dense_matmul(x.astype(self.dtype), kernel, self.in_ndim)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(
                    nn.initializers.zeros_init(), tuple(self.kernel_axes[self.in_ndim :])
                ),
                features,
                self.param_dtype,
            )
            y = y + bias.astype(y.dtype)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """RMSNorm as upstream: statistics in float32, cast back to the input dtype, then * weight
    (with torch's type promotion: a float32 weight gives a float32 result)."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * scale


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with PyTorch's two-pass variance, statistics in float32.

    `affine=False` is DiT's ``LayerNorm(elementwise_affine=False, eps=1e-6)``; the optional
    q/k norm without RMSNorm is ``nn.LayerNorm(head_dim)``: affine, eps 1e-5. The result has
    the input's dtype (as torch autocast's layer_norm on a float32 residual stream).
    """

    eps: float = 1e-6
    affine: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        if self.affine:
            norm_axes = lambda fn: nn.with_logical_partitioning(fn, ("norm",))
            scale = self.param("scale", norm_axes(nn.initializers.ones_init()), (x.shape[-1],),
                               self.param_dtype)
            bias = self.param("bias", norm_axes(nn.initializers.zeros_init()), (x.shape[-1],),
                              self.param_dtype)
            y = y * scale + bias
        return y


def make_norm(use_rmsnorm: bool, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Module:
    if use_rmsnorm:
        return RMSNorm(eps=1e-6, dtype=dtype, param_dtype=param_dtype, name=name)
    return LayerNorm(eps=1e-6, affine=False, dtype=dtype, param_dtype=param_dtype, name=name)


def modulate(x: jax.Array, shift: jax.Array | None, scale: jax.Array) -> jax.Array:
    """adaLN modulation: x (B, T, D) * (1 + scale[:, None]) + shift[:, None]."""
    x = x * (1 + scale[:, None, :])
    return x if shift is None else x + shift[:, None, :]


# ----------------------------------------------------------------------------------------------
# Fixed position tables (numpy constants, computed exactly as upstream)
# ----------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim) = [sin(pos * w), cos(pos * w)], w_k = 10000^(-k / (dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """Frozen DiT position table (grid_size**2, dim) float32, tokens row-major.

    The first dim/2 channels encode the *column* index, the last dim/2 the row index (upstream
    builds the mesh with x first). Computed in float64, then cast, like upstream's numpy code.
    """
    rows, cols = np.meshgrid(
        np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32),
        indexing="ij",
    )
    emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
    return emb.astype(np.float32)


def rope_angles(head_dim: int, grid_size: int) -> np.ndarray:
    """2D RoPE angle table (grid_size**2, head_dim) float32, tokens row-major.

    Upstream ``VisionRotaryEmbeddingFast(dim=head_dim // 2)``: r = head_dim // 2 channels per
    axis, frequencies 10000^(-2j / r) each repeated twice (interleaved pairs); the first r
    channels rotate with the row index, the last r with the column index.
    """
    r = head_dim // 2
    freqs = 1.0 / 10000 ** (np.arange(0, r, 2, dtype=np.float32)[: r // 2] / np.float32(r))
    # upstream positions are arange(G) / G * G in float32 (identical to arange(G) for G = 2^k)
    g = np.float32(grid_size)
    pos = (np.arange(grid_size, dtype=np.float32) / g * g).astype(np.float32)
    ang = np.repeat(np.outer(pos, freqs.astype(np.float32)), 2, axis=-1)  # (G, r)
    return np.concatenate(
        [
            np.broadcast_to(ang[:, None, :], (grid_size, grid_size, r)),  # row angle
            np.broadcast_to(ang[None, :, :], (grid_size, grid_size, r)),  # column angle
        ],
        axis=-1,
    ).reshape(grid_size * grid_size, 2 * r).astype(np.float32)


def rope_tables(head_dim: int, grid_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) of `rope_angles`, each (grid_size**2, head_dim) float32 (upstream's
    ``freqs_cos`` / ``freqs_sin`` buffers, equal to within 1 ulp)."""
    angles = rope_angles(head_dim, grid_size)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate adjacent channel pairs: x (B, T, H, hd), tables (T, hd).

    ``x * cos + rotate_half(x) * sin`` with rotate_half (x0, x1) -> (-x1, x0) on pairs (2i, 2i+1),
    computed as ``x * cos + swap_pairs(x) * (sin * (-1, 1, -1, 1, ...))``: the same products
    (negation is exact), and the backward of a reversal is a reversal, where JAX's rule for
    rotate_half's slices and stack pads and sums (in bf16 a slower gradient).
    """
    swapped = x.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)
    signed_sin = sin * jnp.tile(jnp.asarray([-1, 1], sin.dtype), sin.shape[-1] // 2)
    return x * cos[:, None, :] + swapped * signed_sin[:, None, :]


# ----------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: (B, H, W, C) -> (B, (H/p)(W/p), D), row-major.

    Same as timm's stride-p Conv2d; kernel (p, p, C, D) is xavier-initialised as the
    (D, C*p*p) matrix upstream uses.
    """

    hidden_size: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not divisible by patch size {p}")
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(xavier_uniform(3, 1), (None, None, None, "embed")),
            (p, p, c, self.hidden_size),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            (self.hidden_size,),
            self.param_dtype,
        )
        patches = x.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
        tokens = jnp.einsum("bipjqc,pqcd->bijd", patches, kernel.astype(self.dtype))
        return (tokens + bias.astype(self.dtype)).reshape(b, (h // p) * (w // p), -1)


def timestep_frequencies(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """(B,) flow time in [0, 1] -> (B, dim) = [cos(t f), sin(t f)] (cos first), float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, D): sinusoidal features, Linear -> SiLU -> Linear (weights N(0, 0.02))."""

    hidden_size: int
    frequency_embedding_size: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        h = timestep_frequencies(t, self.frequency_embedding_size)
        kw = dict(kernel_init=nn.initializers.normal(0.02), dtype=self.dtype,
                  param_dtype=self.param_dtype)
        h = Dense((self.hidden_size,), (None, "embed"), name="mlp_0", **kw)(h)
        h = nn.silu(h)
        return Dense((self.hidden_size,), ("mlp", "embed"), name="mlp_2", **kw)(h)


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, D) with a learned null class (index num_classes) for CFG.

    In training mode each label is replaced by the null class with probability
    `dropout_prob`, drawn from the 'label_dropout' rng stream.
    """

    num_classes: int
    hidden_size: int
    dropout_prob: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels: jax.Array, train: bool = False,
                 force_drop_ids: jax.Array | None = None) -> jax.Array:
        use_null = self.dropout_prob > 0
        table = self.param(
            "embedding_table",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("classes", "embed")),
            (self.num_classes + int(use_null), self.hidden_size),
            self.param_dtype,
        )
        if force_drop_ids is not None:
            labels = jnp.where(force_drop_ids == 1, self.num_classes, labels)
        elif train and use_null:
            u = jax.random.uniform(self.make_rng("label_dropout"), labels.shape)
            drop = u < self.dropout_prob
            labels = jnp.where(drop, self.num_classes, labels)
        return jnp.take(table, labels, axis=0).astype(self.dtype)


# ----------------------------------------------------------------------------------------------
# Attention and MLPs
# ----------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with optional q/k norm and 2D RoPE. x (B, T, D) -> (B, T, D)."""

    num_heads: int
    use_qknorm: bool = False
    use_rmsnorm: bool = False
    attention_impl: str | None = None  # see `dot_product_attention`
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        d = x.shape[-1]
        h, hd = self.num_heads, d // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = Dense((3, h, hd), ("embed", None, "heads", "kv"), name="qkv", **kw)(x)
        q, k, v = unstack(qkv, 2)  # each (B, T, H, hd)
        if self.use_qknorm:
            if self.use_rmsnorm:
                q = RMSNorm(1e-6, name="q_norm", **kw)(q)
                k = RMSNorm(1e-6, name="k_norm", **kw)(k)
            else:
                q = LayerNorm(1e-5, affine=True, name="q_norm", **kw)(q)
                k = LayerNorm(1e-5, affine=True, name="k_norm", **kw)(k)
        if rope is not None:
            # float32 tables, as upstream's buffers: under autocast torch promotes a bf16 q / k
            # to float32 here and rounds once, where the attention casts to bf16
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k = q.astype(self.dtype), k.astype(self.dtype)
        q = nn.with_logical_constraint(q, ("act_batch", "act_len", "act_heads", None))
        o = dot_product_attention(q, k, v, implementation=self.attention_impl)
        return Dense((d,), ("heads", "kv", "embed"), in_ndim=2, name="proj", **kw)(o)


class SwiGLUFFN(nn.Module):
    """w3(silu(x1) * x2) with [x1 | x2] = w12(x); w12 kernel stored as (D, 2, hidden)."""

    hidden_features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x12 = Dense((2, self.hidden_features), ("embed", None, "mlp"), name="w12", **kw)(x)
        # plain slices: `unstack` here measured no faster and kept x1, x2 as extra float32
        # residuals (XL/1 batch 32 step, XLA's estimate: +9.5 GiB)
        x1, x2 = x12[..., 0, :], x12[..., 1, :]
        # silu computed in float32 and rounded once, as torch's bf16 kernel (and faster than
        # rounding every step of it)
        hidden = nn.silu(x1.astype(jnp.float32)).astype(x1.dtype) * x2
        hidden = nn.with_logical_constraint(hidden, ("act_batch", "act_len", "act_mlp"))
        return Dense((x.shape[-1],), ("mlp", "embed"), name="w3", **kw)(hidden)


class Mlp(nn.Module):
    """timm Mlp: fc1 -> GELU(tanh) -> fc2."""

    hidden_features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Dense((self.hidden_features,), ("embed", "mlp"), name="fc1", **kw)(x)
        h = nn.gelu(h, approximate=True)
        h = nn.with_logical_constraint(h, ("act_batch", "act_len", "act_mlp"))
        return Dense((x.shape[-1],), ("mlp", "embed"), name="fc2", **kw)(h)
