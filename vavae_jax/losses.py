"""VA-VAE loss terms as pure functions (upstream ``LPIPSWithDiscriminator``), NHWC.

Reconstruction (``pp_style=False``, as every released config):
  rec = |x - x_hat| + perceptual_weight * LPIPS(x, x_hat)     LPIPS (B,1,1,1) broadcast per pixel
  nll = sum(rec / exp(logvar) + logvar) / B                    logvar is a frozen scalar (0)
so per image the objective is sum |x - x_hat| + H*W*C * LPIPS (196,608 x LPIPS at 256x256).
KL: sum over latent elements, mean over the batch (weight 1e-6).
VF loss (vision-foundation alignment) between the projected latent z' and frozen features f:
  distance-matrix term  mean_{b,i,j} relu(|cos(z'_i, z'_j) - cos(f_i, f_j)| - m_dms)
  cosine term           mean_{b,h,w} relu(1 - m_cos - cos(f_hw, z'_hw))
Adaptive weights: ||dA/dW|| / (||dB/dW|| + 1e-4), clamped, no gradient (computed from gradients
by the train step, see `vavae_jax.train_step`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """PyTorch ``F.normalize``: x / max(||x||, eps)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def cosine_similarity(a: jax.Array, b: jax.Array, axis: int = -1, eps: float = 1e-8) -> jax.Array:
    """PyTorch ``F.cosine_similarity``: each vector divided by max(||v||, eps), then dotted."""
    return jnp.sum(l2_normalize(a, axis, eps) * l2_normalize(b, axis, eps), axis=axis)


def reconstruction_nll(x: jax.Array, x_rec: jax.Array, perceptual: jax.Array | None = None, *,
                       perceptual_weight: float = 1.0, logvar: float = 0.0):
    """Upstream NLL of the reconstruction.

    x, x_rec: (B, H, W, C) in [-1, 1]; perceptual: LPIPS distance (B,) or (B, 1, 1, 1), or None.
    Returns (nll_loss, rec_loss): nll summed over pixels and averaged over the batch, and
    rec_loss = the per-element mean of |x - x_rec| + w * LPIPS (upstream's logged value).
    """
    rec = jnp.abs(x - x_rec)
    if perceptual is not None and perceptual_weight > 0:
        rec = rec + perceptual_weight * perceptual.reshape(-1, 1, 1, 1)
    nll = rec / jnp.exp(logvar) + logvar
    return jnp.sum(nll) / x.shape[0], jnp.mean(rec)


def kl_loss(kl_per_sample: jax.Array) -> jax.Array:
    """Posterior KL (B,) -> batch mean (upstream ``sum(kl) / B``)."""
    return jnp.sum(kl_per_sample) / kl_per_sample.shape[0]


def vf_loss_terms(z: jax.Array, f: jax.Array, margin_cos: float, margin_dms: float
                  ) -> tuple[jax.Array, jax.Array]:
    """The two unweighted VF terms for z, f of shape (B, H, W, C) (same C).

    Returns (distance-matrix term, cosine term). `z` is the latent after `linear_proj`, `f` the
    foundation features (treated as constants by the caller); margins 0.25 / 0.5 upstream.
    """
    b, h, w, c = z.shape
    zn = l2_normalize(z.reshape(b, h * w, c))
    fn = l2_normalize(f.reshape(b, h * w, c))
    sim_z = jnp.einsum("bic,bjc->bij", zn, zn)
    sim_f = jnp.einsum("bic,bjc->bij", fn, fn)
    distmat = jnp.mean(jax.nn.relu(jnp.abs(sim_z - sim_f) - margin_dms))
    cos = jnp.mean(jax.nn.relu(1.0 - margin_cos - cosine_similarity(f, z)))
    return distmat, cos


def vf_loss(z: jax.Array, f: jax.Array, *, margin_cos: float = 0.5, margin_dms: float = 0.25,
            distmat_weight: float = 1.0, cos_weight: float = 1.0) -> jax.Array:
    distmat, cos = vf_loss_terms(z, f, margin_cos, margin_dms)
    return distmat_weight * distmat + cos_weight * cos


def adaptive_weight(grad_main, grad_other, *, max_value: float, eps: float = 1e-4) -> jax.Array:
    """clip(||grad_main|| / (||grad_other|| + eps), 0, max_value) without gradient.

    Frobenius norms of the full gradient tensors of one layer (decoder.conv_out for the GAN
    weight, max 1e4; encoder.conv_out for the VF weight, max 1e8).
    """
    ratio = jnp.linalg.norm(grad_main) / (jnp.linalg.norm(grad_other) + eps)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_value))


def adopt_weight(weight: float, global_step: jax.Array, threshold: int) -> jax.Array:
    """taming's schedule: `weight` from `global_step >= threshold` on, 0 before."""
    return jnp.where(global_step >= threshold, weight, 0.0).astype(jnp.float32)


def adaptive_weights(grad_main, grad_other, *, max_value: float) -> jax.Array:
    """`adaptive_weight` per replica (`vavae_jax.replicas`): gradients (R, ...) -> (R,)."""
    return jax.vmap(lambda a, b: adaptive_weight(a, b, max_value=max_value))(grad_main,
                                                                             grad_other)
