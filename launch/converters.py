"""Every checkpoint converter, in the one table `python -m launch.convert` reads.

Each entry names a module with torchport's converter protocol::

    torch_rules(model, **options) -> list[Rule]
    abstract_params(model) -> tree of ShapeDtypeStruct
    params_from_torch(source, model, **options) -> tree     # source: a path or a mapping
    params_to_torch(tree, model, **options) -> {key: np.ndarray}

and says which config family describes the model and how to build it, which command-line
options reach the module's functions, how an upstream file is written, and what the converter
takes from a `launch.train` run. Modules are imported on first use, so an entry whose module
is missing breaks only itself.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from launch import build, params_io
from launch.cli import UserError
from torchport import save_state_dict

DINOV2_L_WIDTH = 1024  # the VF projection's output width without a config


@dataclasses.dataclass(frozen=True)
class Options:
    """Command-line options a converter may use."""

    raw: bool = False  # the raw weights instead of the EMA (runs, upstream training files)
    keep_vf_proj: bool = False  # VA-VAE: keep the VF projection `linear_proj`
    layout: str | None = None  # DINOv2 key layout (reading: detected; writing: timm)


def _none(*_) -> Any:
    return None


def _no_options(_: Options) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class Converter:
    """How `launch.convert <name>` moves one kind of weights between PyTorch and JAX."""

    name: str
    help: str
    module: str  # import path of the protocol module
    families: tuple[str, ...] = ()  # config families describing the model; () takes no config
    model: Callable[[Any, Options], Any] = _none  # (config | None, options) -> model | None
    read_options: Callable[[Options], dict] = _no_options  # params_from_torch keywords
    write_options: Callable[[Options], dict] = _no_options  # params_to_torch keywords
    save_torch: Callable[..., None] | None = None  # (path, tree, model, options); None: flat
    from_run: Callable[[str, Options], Any] | None = None  # (checkpoint dir, options) -> tree
    native_suffix: str | None = None  # a file holding the JAX side besides orbax directories

    def protocol(self):
        return importlib.import_module(self.module)

    def build(self, config, options: Options):
        """The model of `config`; without one, the module's upstream default (None)."""
        return self.model(config, options)

    def read_torch(self, path: str, model, options: Options):
        return self.protocol().params_from_torch(path, model, **self.read_options(options))

    def write_torch(self, path: str, tree, model, options: Options) -> None:
        if self.save_torch is not None:
            self.save_torch(path, tree, model, options)
            return
        state_dict = self.protocol().params_to_torch(tree, model, **self.write_options(options))
        save_state_dict(path, state_dict)

    def abstract(self, model):
        return self.protocol().abstract_params(model)


# -- per-model pieces ---------------------------------------------------------------------------


def _dit_model(config, options):
    from dit_jax.model import LightningDiT

    return None if config is None else LightningDiT(**build.dit_architecture(config))


def _dit_read_options(options):
    return {"select": ("model", "state_dict") if options.raw else ("ema", "model", "state_dict")}


def _dit_save(path, params, model, options):
    from dit_jax.convert import save_torch_checkpoint

    save_torch_checkpoint(path, params, model)


def _run_params(step_dir: str):
    """The run checkpoint's `params` item: the weights its adapter keeps for inference."""
    return params_io.restore_params(os.path.join(step_dir, "params"), None)


def _dit_from_run(step_dir, options):
    if options.raw:
        return params_io.restore_state_entries(step_dir, ["params"])["params"]
    return _run_params(step_dir)  # the EMA


def _vf_width(config) -> int:
    if config is None or config.model.use_vf is None:
        return DINOV2_L_WIDTH
    return build.dinov2(config).embed_dim


def _vavae_model(config, options):
    from vavae_jax.autoencoder import AutoencoderKL

    use_vf = _vf_width(config) if options.keep_vf_proj else None
    return AutoencoderKL(use_vf=use_vf) if config is None else build.autoencoder(config, use_vf)


def _vavae_from_run(step_dir, options):
    from absl import logging

    if options.raw:
        logging.info("VA-VAE runs keep no EMA: --raw exports the same weights")
    if not options.keep_vf_proj:
        return _run_params(step_dir)  # the autoencoder without linear_proj
    params = params_io.restore_state_entries(step_dir, ["params"])["params"]
    if "linear_proj" not in params:
        raise UserError(f"{step_dir}: the run has no VF projection (linear_proj) to keep")
    return params


def _dinov2_model(config, options):
    return None if config is None else build.dinov2(config)


def _lpips_model(config, options):
    from vavae_jax.lpips import LPIPS

    return LPIPS()


def _discriminator_model(config, options):
    from vavae_jax.discriminator import NLayerDiscriminator

    return NLayerDiscriminator(**({} if config is None else dict(config.discriminator)))


def _discriminator_from_run(step_dir, options):
    state = params_io.restore_state_entries(step_dir, ["disc_params", "disc_batch_stats"])
    return {"params": state["disc_params"], "batch_stats": state["disc_batch_stats"]}


def _latent_channels(config, options):
    if config is None:
        return None  # read from the file
    return config.model.in_channels if config.family == "lightningdit" else config.model.embed_dim


def _dinov2_layout(options):
    return {"layout": options.layout or "timm"}


CONVERTERS: dict[str, Converter] = {c.name: c for c in (
    Converter("dit", "LightningDiT (upstream {'model', 'ema'} .pt or a flat state dict)",
              "dit_jax.convert", ("lightningdit",), _dit_model, _dit_read_options,
              save_torch=_dit_save, from_run=_dit_from_run),
    Converter("vavae", "VA-VAE AutoencoderKL (inference keys; linear_proj with --keep_vf_proj)",
              "vavae_jax.convert", ("vavae",), _vavae_model,
              lambda o: {"keep_vf_proj": o.keep_vf_proj}, from_run=_vavae_from_run),
    Converter("dinov2", "DINOv2 (timm, torch_hub, hf, hf_legacy layouts; see --layout)",
              "vavae_jax.dinov2_convert", ("vavae",), _dinov2_model,
              lambda o: {"layout": o.layout}, _dinov2_layout),
    Converter("lpips", "LPIPS VGG16 whole-module state dict (taming / upstream LPIPS())",
              "vavae_jax.lpips", ("vavae",), _lpips_model),
    Converter("discriminator", "VA-VAE PatchGAN NLayerDiscriminator (params + batch_stats)",
              "vavae_jax.discriminator", ("vavae",), _discriminator_model,
              from_run=_discriminator_from_run),
    Converter("inception", "FID Inception-v3 (eval_jax.inception; its upstream state dict)",
              "eval_jax.inception_convert"),
    Converter("latent_stats", "latents_stats.pt {'mean','std'} (1,C,1,1) <-> .npz (C,)",
              "launch.latent_stats", ("lightningdit", "vavae"), _latent_channels,
              native_suffix=".npz"),
)}


def get(name: str) -> Converter:
    if name not in CONVERTERS:
        raise UserError(f"unknown converter {name!r}; expected one of {', '.join(CONVERTERS)}")
    return CONVERTERS[name]


def save_npz(path: str, tree) -> None:
    """A flat tree of arrays as an `.npz` (the JAX side of `native_suffix` converters)."""
    np.savez(path, **{k: np.asarray(v) for k, v in tree.items()})
