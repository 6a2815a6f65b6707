"""Everything a config describes, built in one place.

Training, latent extraction, sampling, evaluation and conversion all build their models,
optimisers and sampler options here, so a config field means the same thing everywhere.
Configs (`configs/*.py`) stay data plus `get_config(arg)`.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

# -- LightningDiT ----------------------------------------------------------------------------


ATTENTION_IMPLS = ("", "explicit", "xla", "cudnn")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype(config: ml_collections.ConfigDict):
    """`config.model.dtype` as a jnp dtype; a `UserError` for a name that is not one of
    `COMPUTE_DTYPES`."""
    name = config.model.dtype
    if name not in COMPUTE_DTYPES:
        from launch.cli import UserError

        raise UserError(f"config.model.dtype {name!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
    return jnp.dtype(name)


def dit_kwargs(config: ml_collections.ConfigDict) -> dict:
    """`LightningDiT` constructor kwargs from `config.model` (dtype string -> jnp dtype;
    `attention_impl` '' -> None, the per-backend choice)."""
    kwargs = config.model.to_dict()
    kwargs.pop("variant")
    kwargs["dtype"] = compute_dtype(config)
    attention = kwargs.get("attention_impl") or ""
    if attention not in ATTENTION_IMPLS:
        from launch.cli import UserError

        raise UserError(f"config.model.attention_impl {attention!r}: expected one of "
                        f"{', '.join(repr(a) for a in ATTENTION_IMPLS)}")
    kwargs["attention_impl"] = attention or None
    return kwargs


def dit_architecture(config: ml_collections.ConfigDict) -> dict:
    """Only the kwargs that shape the parameters (what the PyTorch converters need)."""
    kwargs = dit_kwargs(config)
    for runtime_only in ("dtype", "remat", "attention_impl"):
        kwargs.pop(runtime_only)
    return kwargs


def dit_model(config: ml_collections.ConfigDict):
    from dit_jax import LightningDiT

    return LightningDiT(**dit_kwargs(config))


def _schedule_args(config: ml_collections.ConfigDict) -> tuple:
    opt = config.optimizer
    return (opt.warmup_steps, opt.decay, opt.get("decay_steps") or config.get("total_steps", 0),
            opt.final_lr_fraction)


def dit_optimizer(config: ml_collections.ConfigDict):
    """AdamW of `config.optimizer` (decay over `total_steps` unless `decay_steps` is set)."""
    from dit_jax.train_step import make_optimizer

    opt = config.optimizer
    return make_optimizer(opt.lr, opt.b1, opt.b2, opt.eps, opt.weight_decay,
                          opt.max_grad_norm or None, *_schedule_args(config))


def dit_lr(config: ml_collections.ConfigDict):
    """The learning rate as a function of the step (what `dit_optimizer` applies)."""
    from dit_jax.train_step import lr_schedule

    schedule = lr_schedule(config.optimizer.lr, *_schedule_args(config))
    return schedule if callable(schedule) else (lambda step: jnp.asarray(schedule, jnp.float32))


SAMPLING_METHODS = ("euler", "heun", "euler_maruyama")  # dit_jax.samplers.sample_latents


def sampler_options(config: ml_collections.ConfigDict) -> dict:
    """`dit_jax.samplers.sample_latents` keyword arguments of `config.sample`
    (`cfg_channels = -1` in a config means every channel: None)."""
    opts = config.sample
    if opts.method not in SAMPLING_METHODS or opts.num_steps < 2:
        from launch.cli import UserError

        raise UserError(f"config.sample.method={opts.method!r}, num_steps={opts.num_steps}: "
                        f"expected one of {', '.join(SAMPLING_METHODS)} and at least 2 steps")
    return dict(method=opts.method, num_steps=opts.num_steps,
                timestep_shift=opts.timestep_shift, cfg_scale=opts.cfg_scale,
                cfg_interval_start=opts.cfg_interval_start,
                cfg_channels=None if opts.cfg_channels < 0 else opts.cfg_channels)


# -- VA-VAE ------------------------------------------------------------------------------------


def autoencoder(config: ml_collections.ConfigDict, use_vf: int | None = None, **kwargs):
    """The `AutoencoderKL` of `config.model` (`use_vf`: width of the VF projection, or None)."""
    from vavae_jax.autoencoder import AutoencoderKL

    ddconfig = dict(config.model.ddconfig)
    ddconfig.update(ch_mult=tuple(ddconfig["ch_mult"]),
                    attn_resolutions=tuple(ddconfig["attn_resolutions"]))
    return AutoencoderKL(embed_dim=config.model.embed_dim, **ddconfig, use_vf=use_vf, **kwargs)


def dinov2(config: ml_collections.ConfigDict, dtype=jnp.float32):
    from vavae_jax.dinov2 import dinov2_model

    return dinov2_model(config.foundation.size, dtype=dtype, **config.foundation.overrides)


def vavae_models(config: ml_collections.ConfigDict):
    """(`VAEModels`, `LossConfig`, (autoencoder optimizer, discriminator optimizer))."""
    from vavae_jax.discriminator import NLayerDiscriminator
    from vavae_jax.lpips import LPIPS
    from vavae_jax.train_step import LossConfig, VAEModels, make_optimizers

    dtype = compute_dtype(config)
    foundation = dinov2(config, dtype) if config.model.use_vf is not None else None
    use_vf = foundation.embed_dim if foundation is not None else None
    models = VAEModels(
        autoencoder=autoencoder(config, use_vf, dtype=dtype, remat=config.model.remat),
        discriminator=NLayerDiscriminator(**config.discriminator, dtype=dtype),
        lpips=LPIPS(dtype=dtype) if config.loss.perceptual_weight > 0 else None,
        foundation=foundation,
        imagenet_norm=config.foundation.imagenet_norm,
    )
    loss = LossConfig(**config.loss)
    optimizers = make_optimizers(config.optimizer.lr, config.optimizer.b1, config.optimizer.b2,
                                 proj_fix=config.optimizer.proj_fix)
    return models, loss, optimizers
