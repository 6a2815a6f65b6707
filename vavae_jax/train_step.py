"""VA-VAE training: generator (autoencoder) step and discriminator step as pure functions.

Upstream (vavae/ldm/models/autoencoder.py + LPIPSWithDiscriminator), per iteration:

  z = posterior sample, x_hat = decode(z), f = DINOv2(x) (constant), z' = linear_proj(z)
  L_AE = nll + kl_weight * kl + d_weight * disc_factor_t * g_loss + vf_weight_t * vf_loss
  d_weight    = ||d nll/dW_dec|| / (||d g_loss/dW_dec|| + 1e-4), clip [0, 1e4], * disc_weight
  vf_weight_t = ||d nll/dW_enc|| / (||d vf_loss/dW_enc|| + 1e-4), clip [0, 1e8], * vf_weight
  W_dec = decoder.conv_out kernel, W_enc = encoder.conv_out kernel; both weights carry no grad.
  Adam step on the autoencoder, then the discriminator's hinge loss on (x, x_hat.detach()).

The adaptive weights need gradients of several losses at two layers. Instead of extra
backward passes over the whole model, `generator_grads` runs one forward with `jax.vjp` per
stage (encoder body | encoder head | posterior | decoder body | decoder head | loss heads) and
pulls cotangents back only as far as each quantity needs:

  d nll/dW_dec, d g/dW_dec  : loss heads + the decoder's last conv only
  d vf/dW_enc               : VF head + linear_proj + posterior + the encoder's last convs
  d nll/dW_enc              : one extra decoder backward for activations only (weight
                              gradients of that pass are dead code and removed by XLA)
  total gradient            : one backward through every stage with the combined cotangent.

`vavae_jax.reference_grads` computes the same gradient upstream's way, to check this one.

Upstream ran under DDP, where each GPU takes the adaptive weights from its own 8 images and
normalises the discriminator's BatchNorm with their statistics; `LossConfig.ddp_replicas = R`
does the same for R equal groups of the batch (the gradient is then the mean of the groups',
DDP's all-reduce). The default, 1, takes both over the whole batch.

`global_step` follows PyTorch Lightning's counting with two optimizers (it grows by 2 per
iteration; the generator sees 2k, the discriminator 2k + 1), so `disc_start=5001` behaves as
upstream (iteration ~2500).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from vavae_jax.autoencoder import AutoencoderKL
from vavae_jax.dinov2 import DinoV2, foundation_features
from vavae_jax.discriminator import NLayerDiscriminator
from vavae_jax.distributions import DiagonalGaussian
from vavae_jax.gan import D_LOSSES, generator_loss
from vavae_jax.losses import (
    adaptive_weights,
    adopt_weight,
    kl_loss,
    reconstruction_nll,
    vf_loss,
)
from vavae_jax.lpips import LPIPS
from vavae_jax.replicas import add_replica_axis, per_image, replica_pullbacks, split_replicas


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of ``LPIPSWithDiscriminator`` (released VA-VAE values)."""

    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0
    logvar: float = 0.0  # frozen scalar; upstream initialises it to 0 and never trains it
    disc_start: int = 5001  # in Lightning global steps (2 per iteration)
    disc_factor: float = 1.0
    disc_weight: float = 0.5
    disc_loss: str = "hinge"
    vf_weight: float = 0.1
    adaptive_vf: bool = True
    distmat_margin: float = 0.25
    cos_margin: float = 0.5
    distmat_weight: float = 1.0
    cos_weight: float = 1.0
    steps_per_iteration: int = 2  # Lightning increments global_step per optimizer step
    # R > 1 emulates upstream's R DDP processes: the batch splits into R equal groups, each
    # with its own adaptive GAN / VF weights and discriminator BatchNorm statistics (upstream:
    # 32 GPUs x 8 images); 1 takes both over the whole batch
    ddp_replicas: int = 1


@dataclasses.dataclass(frozen=True)
class VAEModels:
    """The modules of a VA-VAE training setup (hashable: pass them as static arguments)."""

    autoencoder: AutoencoderKL
    discriminator: NLayerDiscriminator
    lpips: LPIPS | None = None  # None: no perceptual term
    foundation: DinoV2 | None = None  # None: no VF loss (plain LDM VAE)
    imagenet_norm: bool = False  # normalise foundation-model inputs (upstream: no)


@flax.struct.dataclass
class VAETrainState:
    step: jax.Array  # completed iterations
    params: Any  # autoencoder: encoder, decoder, quant_conv, post_quant_conv, linear_proj
    opt_state: Any
    disc_params: Any
    disc_batch_stats: Any
    disc_opt_state: Any


def make_optimizers(lr: float = 1e-4, b1: float = 0.5, b2: float = 0.9, *,
                    proj_fix: bool = False) -> tuple[optax.GradientTransformation, ...]:
    """Upstream: Adam(lr, betas (0.5, 0.9)) for the autoencoder (+ linear_proj unless
    `proj_fix`) and for the discriminator; no weight decay, schedule or clipping."""
    ae = optax.adam(lr, b1=b1, b2=b2)
    if proj_fix:
        frozen = lambda params: {k: k == "linear_proj" for k in params}
        ae = optax.chain(optax.masked(optax.set_to_zero(), frozen),
                         optax.masked(ae, lambda p: {k: not v for k, v in frozen(p).items()}))
    return ae, optax.adam(lr, b1=b1, b2=b2)


def _discriminator(models: VAEModels, loss: LossConfig):
    """The discriminator with BatchNorm statistics per replica (`LossConfig.ddp_replicas`)."""
    return models.discriminator.clone(replicas=loss.ddp_replicas)


def _stage(ae: AutoencoderKL, name: str):
    """`ae`'s stage `name` as a function of (its params, input) (see AutoencoderKL.STAGES)."""
    return lambda p, v: ae.apply({"params": p}, v, method=getattr(AutoencoderKL, name))


# ----------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------


def generator_grads(params, disc_params, disc_batch_stats, frozen: dict, x: jax.Array,
                    eps: jax.Array, global_step: jax.Array, *, models: VAEModels,
                    loss: LossConfig):
    """Gradient of the upstream autoencoder objective for one batch.

    Args:
      params: autoencoder params; disc_params / disc_batch_stats: discriminator variables;
      frozen: {'lpips': params or None, 'foundation': params or None} (never trained);
      x: images (B, H, W, 3) in [-1, 1]; eps: posterior noise (B, h, w, embed_dim);
      global_step: Lightning global step seen by the generator loss.
    Returns:
      (grads, new_disc_batch_stats, x_rec, metrics): x_rec is the reconstruction the
      discriminator step uses; metrics are upstream's logged 'train/*' values.
    """
    ae = models.autoencoder
    if ae.dropout > 0:
        raise NotImplementedError(
            f"autoencoder dropout {ae.dropout}: the train step runs the autoencoder "
            "deterministically (every upstream VA-VAE config uses dropout 0.0)")
    batch, replicas = x.shape[0], loss.ddp_replicas
    if replicas < 1 or batch % replicas:
        raise ValueError(f"LossConfig.ddp_replicas={replicas}: a batch of {batch} images does "
                         "not split into that many equal replicas")

    # ---- forward, stage by stage, keeping each stage's pullback ----
    stages = ae.split_stage_params(params)
    h_enc, enc_body_vjp = jax.vjp(lambda p: _stage(ae, "encoder_body")(p, x),
                                  stages["encoder_body"])
    moments, enc_head_vjp = jax.vjp(_stage(ae, "encoder_head"), stages["encoder_head"], h_enc)

    def sample(m):
        posterior = DiagonalGaussian.from_moments(m)
        return posterior.sample_with_eps(eps), posterior.kl()

    (z, kl), sample_vjp = jax.vjp(sample, moments)
    h_dec, dec_body_vjp = jax.vjp(_stage(ae, "decoder_body"), stages["decoder_body"], z)
    x_rec, dec_head_vjp = jax.vjp(_stage(ae, "decoder_head"), stages["decoder_head"], h_dec)

    def nll_head(xr):
        perceptual = None
        if models.lpips is not None and loss.perceptual_weight > 0:
            perceptual = models.lpips.apply({"params": frozen["lpips"]}, x, xr)
        return reconstruction_nll(x, xr, perceptual, perceptual_weight=loss.perceptual_weight,
                                  logvar=loss.logvar)

    def g_head(xr):
        logits, updates = _discriminator(models, loss).apply(
            {"params": disc_params, "batch_stats": disc_batch_stats}, xr, train=True,
            mutable=["batch_stats"])
        return generator_loss(logits), (updates["batch_stats"], logits)

    nll, nll_vjp, rec_loss = jax.vjp(nll_head, x_rec, has_aux=True)
    g_loss, g_vjp, (new_batch_stats, logits_fake) = jax.vjp(g_head, x_rec, has_aux=True)
    (ct_x_nll,) = nll_vjp(jnp.ones_like(nll))
    (ct_x_g,) = g_vjp(jnp.ones_like(g_loss))

    # ---- GAN weight from gradients at decoder.conv_out (loss heads + last conv only) ----
    # One weight per replica (`LossConfig.ddp_replicas`), from the gradients of that replica's
    # own losses: parameter gradients get a leading replica axis (R, ...)
    if replicas == 1:
        (gw_nll, gh_nll), (gw_g, gh_g) = (
            (add_replica_axis(gw), gh) for gw, gh in (dec_head_vjp(ct_x_nll),
                                                        dec_head_vjp(ct_x_g)))
    else:
        (gw_nll, gh_nll), (gw_g, gh_g) = replica_pullbacks(
            _stage(ae, "decoder_head"), stages["decoder_head"], h_dec, (ct_x_nll, ct_x_g),
            replicas)
    if loss.disc_factor > 0:
        d_weight = adaptive_weights(ae.last_conv_kernel(gw_nll), ae.last_conv_kernel(gw_g),
                                     max_value=1e4) * loss.disc_weight
    else:
        d_weight = jnp.zeros((replicas,), jnp.float32)
    disc_factor = adopt_weight(loss.disc_factor, global_step, loss.disc_start)
    w_gan = d_weight * disc_factor  # (R,)

    # ---- VF weight from gradients at encoder.conv_out ----
    use_vf = models.foundation is not None
    ct_z_vf = jnp.zeros_like(z)
    vf_value = jnp.zeros((), jnp.float32)
    vf_weight = jnp.zeros((replicas,), jnp.float32)
    grad_proj = None
    if use_vf:
        latent_grid = z.shape[1:3]
        f = foundation_features(models.foundation, frozen["foundation"], x, latent_grid,
                                imagenet_norm=models.imagenet_norm)

        def vf_of(z_proj, f):
            return vf_loss(z_proj, f, margin_cos=loss.cos_margin, margin_dms=loss.distmat_margin,
                           distmat_weight=loss.distmat_weight, cos_weight=loss.cos_weight)

        z_proj, proj_vjp = jax.vjp(_stage(ae, "vf_head"), stages["vf_head"], z)
        vf_value, vf_vjp = jax.vjp(lambda zp: vf_of(zp, f), z_proj)
        (ct_z_proj,) = vf_vjp(jnp.ones_like(vf_value))
        grad_proj, ct_z_vf = proj_vjp(ct_z_proj)
        if loss.adaptive_vf:
            # d nll / dz needs the decoder backward (activation gradients only); gh_nll / R is
            # the full batch's cotangent (`replica_pullbacks` scales it back by R)
            ct_z_nll = dec_body_vjp(gh_nll / replicas)[1]
            if replicas == 1:
                zeros_kl = jnp.zeros_like(kl)
                gw_enc_nll, gw_enc_vf = (
                    add_replica_axis(enc_head_vjp(sample_vjp((ct, zeros_kl))[0])[0])
                    for ct in (ct_z_nll, ct_z_vf))
            else:
                def moments_to_z(p, h_and_eps):
                    h, e = h_and_eps
                    moments = _stage(ae, "encoder_head")(p, h)
                    return DiagonalGaussian.from_moments(moments).sample_with_eps(e)

                (gw_enc_nll, _), (gw_enc_vf, _) = replica_pullbacks(
                    moments_to_z, stages["encoder_head"], (h_enc, eps), (ct_z_nll, ct_z_vf),
                    replicas)
            vf_weight = adaptive_weights(ae.last_conv_kernel(gw_enc_nll),
                                          ae.last_conv_kernel(gw_enc_vf),
                                          max_value=1e8) * loss.vf_weight
        else:
            vf_weight = jnp.full((replicas,), loss.vf_weight, jnp.float32)

    # ---- total gradient: one backward through every stage ----
    # the mean of the replicas' gradients (DDP's all-reduce): with R > 1 the cotangents above
    # are R x the full batch's, and each image is weighted by its replica's weights
    gh = (gh_nll + per_image(w_gan, gh_g) * gh_g) / replicas
    # (the float32 weight must not promote a bf16 cotangent: vjp wants the output's dtype)
    g_dec_body, ct_z = dec_body_vjp(gh.astype(gh_nll.dtype))
    ct_z = ct_z + per_image(vf_weight, ct_z_vf) * ct_z_vf
    ct_kl = jnp.full_like(kl, loss.kl_weight / batch)  # kl_loss = sum(kl) / B
    (ct_moments,) = sample_vjp((ct_z, ct_kl))
    g_enc_head, ct_h_enc = enc_head_vjp(ct_moments)
    (g_enc_body,) = enc_body_vjp(ct_h_enc)

    def decoder_head_grad(nll_r, g_r):  # (R, ...) each -> the mean over the replicas
        return jnp.mean(nll_r + w_gan.reshape((-1,) + (1,) * (g_r.ndim - 1)) * g_r, axis=0)

    stage_grads = {
        "encoder_body": g_enc_body, "encoder_head": g_enc_head, "decoder_body": g_dec_body,
        "decoder_head": jax.tree.map(decoder_head_grad, gw_nll, gw_g),
    }
    if "vf_head" in stages:
        if not use_vf:
            stage_grads["vf_head"] = jax.tree.map(jnp.zeros_like, stages["vf_head"])
        elif replicas == 1:
            stage_grads["vf_head"] = jax.tree.map(lambda g: vf_weight[0] * g, grad_proj)
        else:
            stage_grads["vf_head"] = proj_vjp(per_image(vf_weight, ct_z_proj) * ct_z_proj)[0]
    grads = ae.merge_stage_params(stage_grads)

    kl_value = kl_loss(kl)
    if replicas == 1:
        weighted = w_gan[0] * g_loss + vf_weight[0] * vf_value
    else:  # each replica's weights times its own losses
        g_per_replica = jax.vmap(generator_loss)(split_replicas(logits_fake, replicas))
        weighted = jnp.mean(w_gan * g_per_replica)
        if use_vf:
            vf_per_replica = jax.vmap(vf_of)(split_replicas(z_proj, replicas),
                                             split_replicas(f, replicas))
            weighted = weighted + jnp.mean(vf_weight * vf_per_replica)
    total = nll + loss.kl_weight * kl_value + weighted
    metrics = {  # d_weight / vf_weight: the mean over the replicas
        "total_loss": total, "logvar": jnp.asarray(loss.logvar, jnp.float32),
        "kl_loss": kl_value, "nll_loss": nll, "rec_loss": rec_loss,
        "d_weight": jnp.mean(d_weight), "disc_factor": disc_factor, "g_loss": g_loss,
        "logits_fake_g": jnp.mean(logits_fake),
    }
    if use_vf:
        metrics.update(vf_loss=vf_value, vf_weight=jnp.mean(vf_weight))
    return grads, new_batch_stats, jax.lax.stop_gradient(x_rec), metrics


# ----------------------------------------------------------------------------------------------
# Discriminator
# ----------------------------------------------------------------------------------------------


def discriminator_loss(disc_params, disc_batch_stats, x, x_rec, global_step, *,
                       models: VAEModels, loss: LossConfig):
    """disc_factor_t * D-loss(D(x), D(x_rec)) with two train-mode passes (real, then fake),
    each normalising with its own batch statistics, as upstream. Returns (loss, aux)."""
    variables = {"params": disc_params, "batch_stats": disc_batch_stats}
    discriminator = _discriminator(models, loss)
    logits_real, upd = discriminator.apply(variables, x, train=True, mutable=["batch_stats"])
    variables = {"params": disc_params, "batch_stats": upd["batch_stats"]}
    logits_fake, upd = discriminator.apply(variables, jax.lax.stop_gradient(x_rec),
                                           train=True, mutable=["batch_stats"])
    disc_factor = adopt_weight(loss.disc_factor, global_step, loss.disc_start)
    d_loss = disc_factor * D_LOSSES[loss.disc_loss](logits_real, logits_fake)
    aux = (upd["batch_stats"], {"disc_loss": d_loss, "logits_real": jnp.mean(logits_real),
                                "logits_fake": jnp.mean(logits_fake)})
    return d_loss, aux


# ----------------------------------------------------------------------------------------------
# One iteration
# ----------------------------------------------------------------------------------------------


def train_step(state: VAETrainState, batch: dict[str, jax.Array], rng: jax.Array,
               frozen: dict, *, models: VAEModels, loss: LossConfig,
               ae_optimizer: optax.GradientTransformation,
               disc_optimizer: optax.GradientTransformation):
    """Generator update, then discriminator update on the same (pre-update) reconstruction.

    batch = {'image': (B, H, W, 3) in [-1, 1]}. The posterior noise comes from `rng` folded
    with the step. Returns (new_state, metrics).
    """
    x = batch["image"]
    ae = models.autoencoder
    f = ae.downsample_factor
    eps_shape = (x.shape[0], x.shape[1] // f, x.shape[2] // f, ae.embed_dim)
    eps = jax.random.normal(jax.random.fold_in(rng, state.step), eps_shape, jnp.float32)
    g_step = loss.steps_per_iteration * state.step

    grads, batch_stats, x_rec, metrics = generator_grads(
        state.params, state.disc_params, state.disc_batch_stats, frozen, x, eps, g_step,
        models=models, loss=loss)
    updates, opt_state = ae_optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    d_step = g_step + (1 if loss.steps_per_iteration > 1 else 0)
    (_, (batch_stats, d_metrics)), d_grads = jax.value_and_grad(discriminator_loss,
                                                                has_aux=True)(
        state.disc_params, batch_stats, x, x_rec, d_step, models=models, loss=loss)
    d_updates, disc_opt_state = disc_optimizer.update(d_grads, state.disc_opt_state,
                                                      state.disc_params)
    disc_params = optax.apply_updates(state.disc_params, d_updates)

    metrics = {**metrics, **d_metrics, "grad_norm": optax.tree.norm(grads),
               "disc_grad_norm": optax.tree.norm(d_grads)}
    new_state = VAETrainState(step=state.step + 1, params=params, opt_state=opt_state,
                              disc_params=disc_params, disc_batch_stats=batch_stats,
                              disc_opt_state=disc_opt_state)
    return new_state, metrics


def init_train_state(models: VAEModels, rng: jax.Array, image_shape: tuple[int, ...], *,
                     ae_optimizer: optax.GradientTransformation,
                     disc_optimizer: optax.GradientTransformation) -> VAETrainState:
    """Fresh autoencoder + discriminator state for images of `image_shape` (B, H, W, 3).

    Parameters keep their logical-partitioning boxes (see `launch.sharding.sharded_init`).
    """
    k_ae, k_disc, k_sample = jax.random.split(rng, 3)
    x = jnp.zeros(image_shape, jnp.float32)
    params = models.autoencoder.init({"params": k_ae, "sample": k_sample}, x)["params"]
    disc_vars = models.discriminator.init(k_disc, x, train=False)
    return VAETrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=ae_optimizer.init(params),
        disc_params=disc_vars["params"], disc_batch_stats=disc_vars["batch_stats"],
        disc_opt_state=disc_optimizer.init(disc_vars["params"]))
