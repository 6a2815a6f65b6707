"""The VA-VAE generator gradient computed the straightforward way, as upstream does it: a
full backward pass for each of nll, g_loss and vf_loss to get the adaptive weights at the two
layers, then one more for the weighted total. `vavae_jax.train_step.generator_grads` gets the
same gradient in one staged pass; this version checks it (tests/test_vavae_train.py) and is
the baseline of `python -m bench.vavae_generator_step`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vavae_jax.autoencoder import AutoencoderKL
from vavae_jax.dinov2 import foundation_features
from vavae_jax.gan import generator_loss
from vavae_jax.losses import adaptive_weight, adopt_weight, kl_loss, reconstruction_nll, vf_loss
from vavae_jax.train_step import LossConfig, VAEModels


def reference_generator_grads(params, disc_params, disc_batch_stats, frozen: dict,
                              x: jax.Array, eps: jax.Array, global_step: jax.Array, *,
                              models: VAEModels, loss: LossConfig):
    """The same gradient as `generator_grads`, computed the straightforward way: a full
    gradient of each of nll, g_loss and vf_loss for the adaptive weights, then one of the total
    (upstream's autograd.grad calls). Slow; it validates and benchmarks the staged version.
    Returns (grads, d_weight, vf_weight)."""
    ae = models.autoencoder
    use_vf = models.foundation is not None
    disc_vars = {"params": disc_params, "batch_stats": disc_batch_stats}
    f = (foundation_features(models.foundation, frozen["foundation"], x, eps.shape[1:3],
                             imagenet_norm=models.imagenet_norm) if use_vf else None)

    def terms(p):
        posterior = ae.apply({"params": p}, x, method=AutoencoderKL.encode)
        z = posterior.sample_with_eps(eps)
        x_rec = ae.apply({"params": p}, z, method=AutoencoderKL.decode)
        perceptual = None
        if models.lpips is not None and loss.perceptual_weight > 0:
            perceptual = models.lpips.apply({"params": frozen["lpips"]}, x, x_rec)
        nll, _ = reconstruction_nll(x, x_rec, perceptual,
                                    perceptual_weight=loss.perceptual_weight, logvar=loss.logvar)
        logits, _ = models.discriminator.apply(disc_vars, x_rec, train=True,
                                               mutable=["batch_stats"])
        out = {"nll": nll, "kl": kl_loss(posterior.kl()), "g": generator_loss(logits),
               "vf": jnp.zeros((), jnp.float32)}
        if use_vf:
            z_proj = ae.apply({"params": p}, z, method=AutoencoderKL.project_vf)
            out["vf"] = vf_loss(z_proj, f, margin_cos=loss.cos_margin,
                                margin_dms=loss.distmat_margin,
                                distmat_weight=loss.distmat_weight, cos_weight=loss.cos_weight)
        return out

    grad_of = {k: jax.grad(lambda p, k=k: terms(p)[k])(params) for k in ("nll", "g", "vf")}
    last = lambda g, part: g[part]["conv_out"]["kernel"]
    d_weight = jnp.zeros((), jnp.float32)
    if loss.disc_factor > 0:
        d_weight = adaptive_weight(last(grad_of["nll"], "decoder"), last(grad_of["g"], "decoder"),
                                   max_value=1e4) * loss.disc_weight
    vf_weight = jnp.zeros((), jnp.float32)
    if use_vf:
        vf_weight = (adaptive_weight(last(grad_of["nll"], "encoder"),
                                     last(grad_of["vf"], "encoder"), max_value=1e8)
                     * loss.vf_weight if loss.adaptive_vf else jnp.float32(loss.vf_weight))
    w_gan = d_weight * adopt_weight(loss.disc_factor, global_step, loss.disc_start)

    def total(p):
        t = terms(p)
        return t["nll"] + loss.kl_weight * t["kl"] + w_gan * t["g"] + vf_weight * t["vf"]

    return jax.grad(total)(params), d_weight, vf_weight
