"""LightningDiT (Linen, NHWC): DiT with SwiGLU, RMSNorm, 2D RoPE, optional QK-norm.

Numerically identical to upstream ``models/lightningdit.py`` in float32 (see tests/), with the
same constructor arguments. Extras for JAX: `dtype` (compute dtype, e.g. bfloat16, while the
residual stream and parameters stay float32), `remat` (activation checkpointing per block) and
`attention_impl` (see `dit_jax.ops.dot_product_attention`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from dit_jax.guidance import apply_guidance
from dit_jax.layers import (
    Attention,
    Dense,
    Dtype,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    SwiGLUFFN,
    TimestepEmbedder,
    make_norm,
    modulate,
    rope_tables,
    sincos_pos_embed_2d,
)

# Size presets (depth, width, heads) x patch sizes 1, 2, 4. Upstream registers B/1, B/2, L/2,
# XL/1, XL/2, 1p0B/* and 1p6B/*; S follows DiT-S. Names as upstream: "LightningDiT-XL/1".
SIZES: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "1p0B": dict(depth=24, hidden_size=1536, num_heads=24),
    "1p6B": dict(depth=28, hidden_size=1792, num_heads=28),
}
VARIANTS: dict[str, dict[str, int]] = {
    f"LightningDiT-{size}/{p}": {**dims, "patch_size": p}
    for size, dims in SIZES.items()
    for p in (1, 2, 4)
}

# Flags of the released VA-VAE + LightningDiT-XL/1 checkpoints (configs/*.yaml upstream).
RELEASED_FLAGS = dict(
    input_size=16, in_channels=32, use_qknorm=False, use_swiglu=True, use_rope=True,
    use_rmsnorm=True, wo_shift=False,
)


def swiglu_hidden_size(hidden_size: int, mlp_ratio: float) -> int:
    """Upstream ``int(2/3 * int(hidden_size * mlp_ratio))`` (no rounding to multiples)."""
    return int(2 / 3 * int(hidden_size * mlp_ratio))


class LightningDiTBlock(nn.Module):
    """adaLN-Zero transformer block: x (B, T, D), c (B, D) -> (B, T, D)."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    use_qknorm: bool = False
    use_swiglu: bool = False
    use_rmsnorm: bool = False
    wo_shift: bool = False
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c, rope):
        d = self.hidden_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n_mod = 4 if self.wo_shift else 6
        # Zero-initialised adaLN: every block starts as the identity.
        mod = Dense((n_mod, d), ("embed", None, None), kernel_init=nn.initializers.zeros_init(),
                    name="adaLN_modulation", **kw)(nn.silu(c))  # (B, n_mod, D)
        # Modulation and gating run in float32 on the float32 residual stream (torch's type
        # promotion under autocast); only the matmuls use `dtype`.
        mod = mod.astype(jnp.float32)
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = (mod[:, i] for i in range(4))
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
                mod[:, i] for i in range(6)
            )

        h = modulate(make_norm(self.use_rmsnorm, name="norm1", **kw)(x), shift_msa, scale_msa)
        h = Attention(self.num_heads, self.use_qknorm, self.use_rmsnorm, self.attention_impl,
                      name="attn", **kw)(h, rope)
        x = x + gate_msa[:, None, :] * h

        h = modulate(make_norm(self.use_rmsnorm, name="norm2", **kw)(x), shift_mlp, scale_mlp)
        if self.use_swiglu:
            mlp = SwiGLUFFN(swiglu_hidden_size(d, self.mlp_ratio), name="mlp", **kw)
        else:
            mlp = Mlp(int(d * self.mlp_ratio), name="mlp", **kw)
        x = x + gate_mlp[:, None, :] * mlp(h)
        return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + norm + linear to p*p*C_out per token; zero-initialised."""

    hidden_size: int
    patch_size: int
    out_channels: int
    use_rmsnorm: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        zeros = nn.initializers.zeros_init()
        mod = Dense((2, self.hidden_size), ("embed", None, None), kernel_init=zeros,
                    name="adaLN_modulation", **kw)(nn.silu(c)).astype(jnp.float32)
        shift, scale = mod[:, 0], mod[:, 1]
        x = modulate(make_norm(self.use_rmsnorm, name="norm_final", **kw)(x), shift, scale)
        out = self.patch_size * self.patch_size * self.out_channels
        return Dense((out,), ("embed", None), kernel_init=zeros, name="linear", **kw)(x)


class LightningDiT(nn.Module):
    """LightningDiT velocity model.

    ``model.apply({'params': p}, x, t, y)``: x (B, H, W, C) latents with H = W = input_size,
    t (B,) flow time in [0, 1] (t = 0 noise, t = 1 data), y (B,) int labels in
    [0, num_classes] (num_classes = the null class). Returns the velocity (B, H, W, C).
    Label dropout for CFG training happens when ``train=True`` and a 'label_dropout' rng is
    given. The frozen sin-cos position table and the RoPE tables are constants, not params.
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 32
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = False
    use_qknorm: bool = False
    use_swiglu: bool = False
    use_rope: bool = False
    use_rmsnorm: bool = False
    wo_shift: bool = False
    # JAX-side options (no effect on the parameters or, in float32, on the numerics)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention_impl: str | None = None

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    def setup(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} not divisible by {self.num_heads} heads")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.x_embedder = PatchEmbed(self.hidden_size, self.patch_size, **kw)
        self.t_embedder = TimestepEmbedder(self.hidden_size, **kw)
        self.y_embedder = LabelEmbedder(self.num_classes, self.hidden_size,
                                        self.class_dropout_prob, **kw)
        block_cls = nn.remat(LightningDiTBlock) if self.remat else LightningDiTBlock
        self.blocks = [
            block_cls(self.hidden_size, self.num_heads, self.mlp_ratio, self.use_qknorm,
                      self.use_swiglu, self.use_rmsnorm, self.wo_shift, self.attention_impl,
                      name=f"blocks_{i}", **kw)
            for i in range(self.depth)
        ]
        self.final_layer = FinalLayer(self.hidden_size, self.patch_size, self.out_channels,
                                      self.use_rmsnorm, **kw)

    def __call__(self, x, t, y, train: bool = False, force_drop_ids=None):
        b, h, w, c = x.shape
        expected = (self.input_size, self.input_size, self.in_channels)
        if (h, w, c) != expected:
            raise ValueError(f"LightningDiT expects inputs (B, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}) NHWC, got {x.shape}")
        g, p = self.grid_size, self.patch_size
        pos_embed = jnp.asarray(sincos_pos_embed_2d(self.hidden_size, g))
        # The residual stream stays float32 (as under torch autocast); matmuls use `dtype`.
        tokens = self.x_embedder(x).astype(jnp.float32) + pos_embed[None]
        tokens = nn.with_logical_constraint(tokens, ("act_batch", "act_len", "act_embed"))
        c = self.t_embedder(t) + self.y_embedder(y, train, force_drop_ids)
        rope = None
        if self.use_rope:
            rope = tuple(jnp.asarray(a) for a in rope_tables(self.hidden_size // self.num_heads, g))
        for block in self.blocks:
            tokens = block(tokens, c, rope)
        out = self.final_layer(tokens, c).astype(jnp.float32)  # (B, T, p*p*C_out)
        out = out.reshape(b, g, g, p, p, self.out_channels)
        out = out.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * p, g * p, self.out_channels)
        return out[..., : self.in_channels] if self.learn_sigma else out

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_interval_start=0.0, cfg_channels=None):
        """Upstream ``forward_with_cfg`` semantics on a doubled batch.

        x = [x_c; x_u], y = [labels; null]: runs the model on [x_c; x_c] and returns the guided
        velocity (see `apply_guidance`) in both halves; channels beyond `cfg_channels` keep the
        raw conditional / unconditional outputs, as upstream does. Samplers use the cheaper
        `dit_jax.samplers.guided_velocity_fn`, which returns only the kept half.
        """
        n = x.shape[0] // 2
        out = self(jnp.concatenate([x[:n], x[:n]]), t, y)
        cond, uncond = out[:n], out[n:]
        guided = apply_guidance(cond, uncond, t[:n], cfg_scale=cfg_scale,
                                cfg_interval_start=cfg_interval_start, cfg_channels=cfg_channels)
        if cfg_channels is None:
            return jnp.concatenate([guided, guided])
        k = cfg_channels
        second = jnp.concatenate([guided[..., :k], uncond[..., k:]], axis=-1)
        return jnp.concatenate([guided, second])


def lightningdit_kwargs(variant: str, **overrides) -> dict:
    """Constructor kwargs for a registry name, e.g. ``lightningdit_kwargs('LightningDiT-XL/1',
    **RELEASED_FLAGS)``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown LightningDiT variant {variant!r}; known: {sorted(VARIANTS)}")
    return {**VARIANTS[variant], **overrides}


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
