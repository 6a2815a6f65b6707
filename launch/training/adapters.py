"""What the training loop needs to know about each model, behind one small interface.

An adapter builds, from a config: the state (boxed with logical axes, for `eval_shape`), the
pure step ``step(state, batch, rng, frozen) -> (state, metrics)``, the frozen tree (DINOv2 and
LPIPS for the VA-VAE, nothing for LightningDiT), the data iterator, the weights saved for
inference, a FLOP count per example and a PNG grid to look at. The loop never branches on the
model.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from launch import build, sharding
from launch import images as image_grids


def abstract_like(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def forward_flops(fn, *abstract_args) -> float:
    """FLOPs (2*MAC) of one call of `fn`, from XLA's cost analysis of the lowered program."""
    analysis = jax.jit(fn).lower(*abstract_args).cost_analysis()
    return float(analysis["flops"]) if analysis and "flops" in analysis else float("nan")


def _copy(tree):
    """Fresh buffers with the same shardings: the step donates params and EMA, and one buffer
    cannot be donated twice."""
    return jax.tree.map(lambda x: x.copy(), tree)


class LightningDiTAdapter:
    """Rectified-flow LightningDiT on latents (`config.data` = a latent directory)."""

    def __init__(self, config):
        self.config = config
        self.model = build.dit_model(config)
        self.optimizer = build.dit_optimizer(config)
        self.lr = build.dit_lr(config)

    def init_state(self, rng):
        from dit_jax.train_step import init_train_state

        return init_train_state(self.model, self.optimizer, rng)

    def step(self, state, batch, rng, frozen):
        from dit_jax.train_step import train_step

        del frozen
        lr = self.lr(state.step)  # the rate this step applies (optax counts from 0)
        c = self.config
        state, metrics = train_step(
            state, batch, rng, model=self.model, optimizer=self.optimizer,
            ema_decay=c.train.ema_decay, time_dist=c.transport.time_dist,
            use_cosine_loss=c.transport.use_cosine_loss,
            accum_steps=c.train.get("grad_accum_steps", 1),
            uniform_time_after=c.transport.get("uniform_time_after", 0))
        return state, {**metrics, "lr": lr}

    def frozen(self, mesh):
        del mesh
        return {}

    def prepare_latents(self) -> None:
        """Latents absent and `config.data.prepare` names a VA-VAE config variant: encode its
        images into `config.data.path` first (the tiny config: procedural shapes through the
        tiny VA-VAE, or a trained one given by `config.data.prepare_checkpoint`; the images at
        `config.data.prepare_images`, else at that VA-VAE config's data.path)."""
        import os

        data = self.config.data
        if not data.get("prepare"):
            return
        from launch.data import extraction, latents

        done = os.path.exists(os.path.join(data.path, extraction.SUMMARY_FILE))
        # latents made elsewhere (upstream's extraction: statistics, no layout file of ours)
        foreign = (os.path.exists(os.path.join(data.path, latents.STATS_FILE))
                   and not os.path.exists(os.path.join(data.path, extraction.LAYOUT_FILE)))
        if done or foreign:
            return  # an extraction of ours killed before its summary is resumed below
        from configs.vavae import get_config as vavae_config

        logging.info("no finished latents at %s: extracting them with configs/vavae.py:%s",
                     data.path, data.prepare)
        tokenizer_config = vavae_config(data.prepare)
        if data.get("prepare_images"):
            tokenizer_config.data.path = data.prepare_images
        extraction.extract_latents(tokenizer_config, data.path,
                                   data.get("prepare_checkpoint") or None)

    def make_iterator(self, *, global_batch_size: int, mesh):
        from launch.data.latents import make_latent_iterator

        self.prepare_latents()
        m = self.model
        return make_latent_iterator(self.config.data, global_batch_size=global_batch_size,
                                    seed=self.config.seed, num_classes=m.num_classes,
                                    latent_size=m.input_size, channels=m.in_channels, mesh=mesh)

    def inference_params(self, state):
        return state.ema_params

    def init_from(self, path: str, state, shardings):
        """Start from released / converted weights, or continue an upstream PyTorch run.

        An orbax params directory (or a run's workdir) or an upstream `.pt` / `.safetensors`
        sets params and EMA (fresh optimiser, step 0); an upstream *training* checkpoint
        (`model`, `ema`, `opt`) also brings AdamW's moments and the step."""
        from dit_jax.convert import params_from_torch
        from launch import params_io
        from launch.training.torch_import import train_state_from_torch
        from torchport import read_checkpoint

        if os.path.isdir(path):
            params = params_io.restore_params(params_io.resolve_params_dir(path),
                                              abstract_like(state.params), shardings.params)
            return state.replace(params=params, ema_params=_copy(params))
        raw = read_checkpoint(path)
        if "opt" in raw:
            logging.info("continuing the upstream training run %s (weights, EMA, AdamW)", path)
            imported = train_state_from_torch(raw, model_kwargs=build.dit_architecture(self.config),
                                              optimizer=self.optimizer,
                                              optimizer_config=dict(self.config.optimizer))
            return jax.device_put(imported, shardings)
        params = jax.device_put(params_from_torch(raw, self.model), shardings.params)
        return state.replace(params=params, ema_params=_copy(params))

    def flops_per_example(self, params) -> float:
        s, c = self.model.input_size, self.model.in_channels
        args = (jax.ShapeDtypeStruct((1, s, s, c), jnp.float32),
                jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32))
        fwd = forward_flops(lambda p, x, t, y: self.model.apply({"params": p}, x, t, y),
                            params, *args)
        return 3.0 * fwd  # forward + backward (twice the forward)

    def visualise(self, state, batch, rng) -> np.ndarray:
        """EMA samples (16 Euler steps, classes 0, 1, ...): decoded to images when
        `config.tokenizer` names a VA-VAE, else their first three latent channels."""
        from dit_jax.samplers import sample_latents

        m = self.model
        n = 8

        def sample(params, rng):  # noise and labels made on the devices: no host copies
            noise = jax.random.normal(rng, (n, m.input_size, m.input_size, m.in_channels))
            labels = jnp.arange(n) % m.num_classes
            return sample_latents(m, params, noise, labels, rng, method="euler", num_steps=16,
                                  timestep_shift=0.0, cfg_scale=1.0)

        latents = jax.device_get(jax.jit(sample)(state.ema_params, rng))
        decode = self._tokenizer()
        if decode is None:
            preview = image_grids.latent_preview(latents)
            return image_grids.make_grid(preview, upscale=max(1, 64 // m.input_size))
        images = image_grids.to_uint8(decode(latents))
        return image_grids.make_grid(images, upscale=max(1, 64 // images.shape[1]))

    @functools.cache  # noqa: B019 (one tokenizer per adapter)
    def _tokenizer(self):
        """Normalised latents -> images in [-1, 1], or None without `config.tokenizer`."""
        tokenizer = self.config.get("tokenizer")
        if not tokenizer or not tokenizer.variant:
            return None
        from configs.vavae import get_config
        from launch.data.extraction import load_autoencoder_params
        from launch.data.latents import LatentShardSource, load_or_compute_stats

        vavae_config = get_config(tokenizer.variant)
        vae = build.autoencoder(vavae_config)
        # this process's own device: each process decodes the (replicated) samples itself
        one_device = sharding.create_mesh((1, 1, 1), jax.local_devices()[:1])
        # loaded once, at the first grid: not a per-step copy, so exempt from the loop's guard
        with jax.transfer_guard("allow"):
            params = load_autoencoder_params(vavae_config, vae, tokenizer.checkpoint or None,
                                             one_device)
        data = self.config.data
        mean, std = (load_or_compute_stats(LatentShardSource(data.path)) if data.latent_norm
                     else (0.0, 1.0))
        decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))
        return lambda x: jax.device_get(decode(  # explicit copies (config.transfer_guard)
            params, jax.device_put(x * std / data.latent_multiplier + mean)))


class VAVAEAdapter:
    """VA-VAE (autoencoder + PatchGAN, frozen DINOv2 / LPIPS) on images."""

    def __init__(self, config):
        from launch.cli import UserError

        self.config = config
        if config.train.get("grad_accum_steps", 1) != 1:
            raise UserError("train.grad_accum_steps: the VA-VAE's adaptive loss weights are "
                             "gradient norms of the whole batch, so micro-batches would change "
                             "the objective; use 1 (a smaller global batch, or more devices)")
        replicas, batch = config.loss.get("ddp_replicas", 1), config.train.global_batch_size
        if not isinstance(replicas, int) or replicas < 1 or batch % replicas:
            raise UserError(f"config.loss.ddp_replicas={replicas!r}: train.global_batch_size="
                            f"{batch} does not split into that many equal replicas (upstream: "
                            "32 for 32 GPUs x 8 images)")
        self.models, self.loss, (self.ae_opt, self.disc_opt) = build.vavae_models(config)
        self.image_size = config.data.image_size

    def init_state(self, rng):
        from vavae_jax.train_step import init_train_state

        s = self.image_size
        return init_train_state(self.models, rng, (1, s, s, 3), ae_optimizer=self.ae_opt,
                                disc_optimizer=self.disc_opt)

    def step(self, state, batch, rng, frozen):
        from launch.data.preprocess import to_model_range
        from vavae_jax.train_step import train_step

        # upstream's VA-VAE data scales with taming's x / 127.5 - 1 (bit-exact table)
        batch = {"image": to_model_range(batch["image"], "taming")}
        state, metrics = train_step(state, batch, rng, frozen, models=self.models,
                                    loss=self.loss, ae_optimizer=self.ae_opt,
                                    disc_optimizer=self.disc_opt)
        # `loss`: the optimised total; upstream's VA-VAE lr is constant
        return state, {"loss": metrics["total_loss"], **metrics,
                       "lr": jnp.asarray(self.config.optimizer.lr, jnp.float32)}

    def frozen(self, mesh):
        """{'lpips': params | None, 'foundation': params | None} on `mesh`: replicated, or
        FSDP-sharded like trained weights with `config.shard_frozen` (DINOv2-L is 1.2 GB)."""
        from launch.training.frozen import frozen_shardings, load_frozen

        frozen = load_frozen(self.config, self.models)
        if self.config.get("shard_frozen"):
            return jax.device_put(frozen, frozen_shardings(self.models, frozen, mesh))
        return jax.device_put(frozen, sharding.replicated(mesh))

    def make_iterator(self, *, global_batch_size: int, mesh):
        from launch.data.image_pipeline import make_image_iterator

        return make_image_iterator(self.config.data, global_batch_size=global_batch_size,
                                   seed=self.config.seed, mesh=mesh)

    def inference_params(self, state):
        return {k: v for k, v in state.params.items() if k != "linear_proj"}

    def init_from(self, path: str, state, shardings):
        """Weights of a previous stage, fresh optimisers, step 0 (upstream's `init_weight`).

        A VA-VAE run's workdir (its latest state: autoencoder + discriminator), an orbax params
        directory, or an upstream `.pt` / `.ckpt` (autoencoder, `linear_proj` and the
        discriminator when present; missing parts keep their initialisation)."""
        from launch import params_io
        from torchport import load_state_dict
        from vavae_jax import discriminator
        from vavae_jax.convert import params_from_torch

        ae = self.models.autoencoder
        if os.path.isdir(os.path.join(path, "checkpoints")):
            from launch.training.checkpointing import Checkpointer, abstract_with_shardings

            previous = Checkpointer(path, async_save=False, read_only=True)
            restored = previous.restore_latest(
                abstract_with_shardings(abstract_like(state), shardings))
            previous.close()
            if restored is None:
                raise FileNotFoundError(f"{path} holds no readable checkpoint")
            step, prev, _ = restored
            logging.info("initialised the autoencoder and discriminator from %s",
                         os.path.join(previous.directory, str(step)))
            return state.replace(params=prev.params, disc_params=prev.disc_params,
                                 disc_batch_stats=prev.disc_batch_stats)
        if os.path.isdir(path):
            loaded = params_io.restore_params(path, None)
        else:
            sd = load_state_dict(path, select=("state_dict",))
            has_proj = any(k.startswith("linear_proj.") for k in sd)
            loaded = params_from_torch(sd, ae, keep_vf_proj=has_proj and ae.use_vf is not None)
            if any(k.startswith(discriminator.CHECKPOINT_PREFIX) for k in sd):
                disc = discriminator.params_from_torch(sd, self.models.discriminator)
                state = state.replace(
                    disc_params=jax.device_put(disc["params"], shardings.disc_params),
                    disc_batch_stats=jax.device_put(disc["batch_stats"],
                                                    shardings.disc_batch_stats))
        params = {**state.params, **{k: v for k, v in loaded.items() if k in state.params}}
        logging.info("initialised %s from %s", sorted(k for k in loaded if k in state.params),
                     path)
        return state.replace(params=jax.device_put(params, shardings.params))

    def flops_per_example(self, params, count=forward_flops) -> float:
        """Per image: autoencoder forward + backward (x3); frozen DINOv2 forward (x1); LPIPS on
        (x, x_rec) with the gradient to x_rec (x1.5); the discriminator's two calls in the
        generator step and two with weight gradients in its own step (x8). The adaptive-weight
        pullbacks and the VF loss are left out (< 1%). `count(fn, *abstract_args)` gives one
        forward's FLOPs (default: XLA's cost analysis)."""
        s = self.image_size
        x = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
        key = jax.random.key(0)
        m = self.models
        ae = m.autoencoder
        total = 3.0 * count(
            lambda p, x: ae.apply({"params": p}, x, sample_posterior=False)[0], params, x)
        disc = jax.eval_shape(functools.partial(m.discriminator.init, train=False), key, x)
        total += 8.0 * count(
            lambda v, x: m.discriminator.apply(v, x, train=False), disc, x)
        if m.lpips is not None:
            lp = jax.eval_shape(m.lpips.init, key, x, x)
            total += 1.5 * count(lambda v, x: m.lpips.apply(v, x, x), lp, x)
        if m.foundation is not None:
            grid = s // ae.downsample_factor * 14  # DINOv2 sees 14 x the latent grid
            xf = jax.ShapeDtypeStruct((1, grid, grid, 3), jnp.float32)
            vit = jax.eval_shape(m.foundation.init, key, xf)
            total += count(lambda v, x: m.foundation.apply(v, x), vit, xf)
        return total

    def visualise(self, state, batch, rng) -> np.ndarray:
        """Originals (top row) over reconstructions (posterior means), 8 images."""
        from launch.data.preprocess import to_model_range

        del rng
        ae = self.models.autoencoder

        def reconstruct(params, images):
            x = to_model_range(images[:8], "taming")
            return x, ae.apply({"params": params}, x, sample_posterior=False)[0]

        # sliced and reconstructed on the devices, replicated so that every process can fetch
        # them, then copied explicitly (config.transfer_guard)
        replicated = NamedSharding(batch["image"].sharding.mesh, PartitionSpec())
        x, recon = jax.device_get(jax.jit(reconstruct, out_shardings=replicated)(
            state.params, batch["image"]))
        both = np.concatenate([image_grids.to_uint8(x), image_grids.to_uint8(recon)])
        return image_grids.make_grid(both, ncols=len(x), upscale=max(1, 64 // self.image_size))


ADAPTERS = {"lightningdit": LightningDiTAdapter, "vavae": VAVAEAdapter}


def make_adapter(config):
    family = config.get("family")
    if family not in ADAPTERS:
        from launch.cli import UserError

        raise UserError(f"config.family={family!r}: expected one of {sorted(ADAPTERS)}")
    logging.info("model family %s", family)
    return ADAPTERS[family](config)
