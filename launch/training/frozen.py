"""The VA-VAE's frozen tree: DINOv2 (VF loss) and LPIPS (perceptual loss) weights.

Loaded from files named in the config, never trained and never checkpointed:
  config.foundation.checkpoint  DINOv2 ViT-L/14: timm `model.safetensors`, the official
                                `dinov2_vitl14_pretrain.pth`, a transformers file, or an orbax
                                params directory (`launch.convert dinov2`)
  config.lpips.vgg16            torchvision `vgg16-397923af.pth`
  config.lpips.heads            LPIPS `vgg.pth` (lin0..lin4)
Only the `tiny` config may run without them, on random weights, and it says so.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging
from flax import linen as nn

from launch import params_io
from launch.cli import UserError


def _random(module, rng, *args, what: str):
    logging.warning("*" * 72)
    logging.warning("%s: RANDOM weights (tiny config without a checkpoint)", what)
    logging.warning("*" * 72)
    return nn.meta.unbox(module.init(rng, *args)["params"])


def frozen_shardings(models, frozen: dict, mesh) -> dict:
    """Shardings of the frozen tree from the modules' logical axis names (as for trained
    weights), so FSDP splits DINOv2's and VGG's widths over the mesh."""
    from launch import sharding

    out = {}
    for key, module, args in (("foundation", models.foundation, 1),
                              ("lpips", models.lpips, 2)):
        if frozen.get(key) is None:
            out[key] = None
            continue
        size = 28 if key == "foundation" else 32
        x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        boxed = jax.eval_shape(module.init, jax.random.key(0), *([x] * args))["params"]
        out[key] = sharding.logical_shardings(boxed, mesh)
    return out


def load_frozen(config, models) -> dict:
    """{'foundation': params | None, 'lpips': params | None} for `models` (a `VAEModels`)."""
    tiny = config.get("random_weights_ok", False)  # the CPU-sized configs (tiny, demo)
    rng = jax.random.key(config.seed + 7)
    frozen = {"foundation": None, "lpips": None}
    if models.foundation is not None:
        path = config.foundation.get("checkpoint", "")
        vit = models.foundation
        x = jnp.zeros((1, 14 * 2, 14 * 2, 3))
        if path:
            from vavae_jax.dinov2_convert import abstract_params, params_from_torch

            frozen["foundation"] = params_io.load_params(
                path, abstract=abstract_params(vit), from_torch=lambda p: params_from_torch(p, vit))
        elif tiny:
            frozen["foundation"] = _random(vit, rng, x, what="DINOv2")
        else:
            raise UserError("config.foundation.checkpoint is empty: the VF loss needs DINOv2 "
                            "ViT-L/14 weights (timm model.safetensors or "
                            "dinov2_vitl14_pretrain.pth; see README)")
    if models.lpips is not None:
        vgg, heads = config.lpips.get("vgg16", ""), config.lpips.get("heads", "")
        if vgg and heads:
            from vavae_jax.lpips import params_from_torchvision

            frozen["lpips"] = params_from_torchvision(vgg, heads, models.lpips)
        elif tiny:
            x = jnp.zeros((1, 32, 32, 3))
            frozen["lpips"] = _random(models.lpips, rng, x, x, what="LPIPS")
        else:
            raise UserError("config.lpips.vgg16 / config.lpips.heads are empty: the perceptual "
                            "loss needs vgg16-397923af.pth and LPIPS vgg.pth (see README)")
    return frozen
