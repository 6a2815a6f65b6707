"""LPIPS perceptual distance (VGG16 variant) as used by the VA-VAE reconstruction loss.

Behaviour follows taming-transformers' ``LPIPS`` (identical to upstream ``models/lpips.py``):

1. scale both images per RGB channel: ``(x - SHIFT) / SCALE`` (inputs in [-1, 1]);
2. run the VGG16 convolutional trunk (13 3x3 convs with ReLU, 2x2 max-pools between the
   five blocks) and tap relu1_2, relu2_2, relu3_3, relu4_3, relu5_3;
3. per tap: unit-normalise each position over channels, ``f / (||f||_2 + 1e-10)``, take the
   squared difference of the two images' features, apply a 1x1 no-bias conv to one channel
   (the upstream Dropout before it is inactive: LPIPS is always in eval mode), average over
   space;
4. sum the five per-layer values.

Layout is NHWC; the result is (B, 1, 1, 1) so it broadcasts over pixels like upstream's.

The weights are never trained. Keep the LPIPS parameters out of the optimiser's tree (pass
them as a constant to the loss); `jax.grad` then only flows to the input images.

Where the weights come from
---------------------------
LPIPS needs two downloads, both converted with `params_from_torchvision`:

* VGG16 trunk: torchvision's ImageNet checkpoint ``vgg16-397923af.pth``
  (``torchvision.models.vgg16(weights="IMAGENET1K_V1")``, downloaded from
  ``https://download.pytorch.org/models/vgg16-397923af.pth``). Keys
  ``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}``; ``classifier.*`` is ignored.
* Linear heads: the LPIPS ``vgg.pth`` that taming-transformers and upstream
  ``models/lpips.py`` download on first use (``URL_MAP["vgg_lpips"]``, checked against md5
  ``d507d7349b931f0638a25a48a722f98a``). The ``lpips`` package (richzhang/PerceptualSimilarity)
  ships the v0.1 heads in the same key layout as ``lpips/weights/v0.1/vgg.pth``.
  Keys ``lin{0..4}.model.1.weight``.

A whole-module state dict (``LPIPS().state_dict()`` of taming or upstream, or the
``loss.perceptual_loss.*`` entries of a VA-VAE training checkpoint) is converted with
`params_from_torch`; `params_to_torch` writes that layout back (the converter protocol of
`torchport`; `model` is always ``LPIPS()``, whose weights do not depend on its fields).

Parameter tree::

    vgg/conv{b}_{i}/kernel (3, 3, C_in, C_out), vgg/conv{b}_{i}/bias (C_out,)
        b = 1..5 (block), i = 1..2 or 1..3 (conv within the block), i.e. conv1_1 .. conv5_3
    lin{k}/kernel (1, 1, C_k, 1) for k = 0..4, C = (64, 128, 256, 512, 512)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from torchport import (
    Rule,
    abstract_variables,
    conv_to_flax,
    conv_to_torch,
    load_state_dict,
    source_name,
    to_flax,
    to_torch,
)

Source = str | os.PathLike | Mapping[str, Any]

# Per-channel input scaling; the upstream buffers have shape (1, 3, 1, 1).
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)
EPS = 1e-10

# VGG16 trunk, one entry per block: (output channels, ((flax name, torchvision `features`
# index), ...)). The taming `net.slice{b}` Sequential keeps the torchvision index as its key.
VGG16_BLOCKS: tuple[tuple[int, tuple[tuple[str, int], ...]], ...] = (
    (64, (("conv1_1", 0), ("conv1_2", 2))),
    (128, (("conv2_1", 5), ("conv2_2", 7))),
    (256, (("conv3_1", 10), ("conv3_2", 12), ("conv3_3", 14))),
    (512, (("conv4_1", 17), ("conv4_2", 19), ("conv4_3", 21))),
    (512, (("conv5_1", 24), ("conv5_2", 26), ("conv5_3", 28))),
)
CHANNELS = tuple(ch for ch, _ in VGG16_BLOCKS)

# Prefix of the LPIPS entries inside a VA-VAE (LPIPSWithDiscriminator) training checkpoint.
CHECKPOINT_PREFIX = "loss.perceptual_loss."


class VGG16Trunk(nn.Module):
    """VGG16 convolutional features, tapped after the last ReLU of each block.

    (B, H, W, 3) -> [(B, H, W, 64), (B, H/2, W/2, 128), (B, H/4, W/4, 256),
                     (B, H/8, W/8, 512), (B, H/16, W/16, 512)]  (floor division at each pool).
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        taps = []
        for block, (channels, convs) in enumerate(VGG16_BLOCKS):
            if block > 0:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))  # VALID, like MaxPool2d(2, 2)
            for name, _ in convs:
                conv = nn.Conv(
                    channels,
                    (3, 3),
                    padding=((1, 1), (1, 1)),
                    dtype=self.dtype,
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")
                    ),
                    bias_init=nn.with_logical_partitioning(
                        nn.initializers.zeros_init(), ("conv_out",)
                    ),
                    name=name,
                )
                x = nn.relu(conv(x))
            taps.append(x)
        return taps


def _unit_normalize(f: jnp.ndarray) -> jnp.ndarray:
    """(B, H, W, C): divide each position by its L2 norm over channels (+1e-10, as upstream)."""
    norm = jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True))
    return f / (norm + EPS)


class LPIPS(nn.Module):
    """LPIPS(VGG16) distance between two image batches in [-1, 1].

    Call: ``LPIPS().apply({'params': params}, x0, x1)`` with x0, x1 of shape (B, H, W, 3);
    returns (B, 1, 1, 1). With ``per_layer=True`` also returns the five per-layer terms as a
    (5, B) array (their sum over axis 0 is the distance).

    The weights are placeholders until loaded (`params_from_torch` / `params_from_torchvision`);
    ``init`` only fixes the tree structure.
    """

    dtype: Any = jnp.float32  # compute dtype of the convolutions

    @nn.compact
    def __call__(self, x0: jnp.ndarray, x1: jnp.ndarray, *, per_layer: bool = False):
        if x0.shape != x1.shape or x0.shape[-1] != 3:
            raise ValueError(f"expected two (B, H, W, 3) images, got {x0.shape} and {x1.shape}")
        batch = x0.shape[0]
        x = jnp.concatenate([x0, x1], axis=0)  # one trunk pass for both images
        x = (x - SHIFT) / SCALE
        taps = VGG16Trunk(dtype=self.dtype, name="vgg")(x)

        layers = []
        for k, f in enumerate(taps):
            f = _unit_normalize(f.astype(jnp.float32))
            diff = (f[:batch] - f[batch:]) ** 2  # (B, h, w, C_k)
            head = nn.Conv(
                1,
                (1, 1),
                use_bias=False,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.zeros_init(), (None, None, "conv_in", None)
                ),
                name=f"lin{k}",
            )
            layers.append(jnp.mean(head(diff), axis=(1, 2, 3)))  # (B,)
        layers = jnp.stack(layers)  # (5, B)
        dist = jnp.sum(layers, axis=0).reshape(batch, 1, 1, 1)
        return (dist, layers) if per_layer else dist


# ----------------------------------------------------------------------------------------
# Conversion from / to PyTorch state dicts
# ----------------------------------------------------------------------------------------


def _trunk_rules(key_of) -> list[Rule]:
    """Rules for the 13 VGG convs; `key_of(block, index)` gives the torch key prefix."""
    rules = []
    for block, (_, convs) in enumerate(VGG16_BLOCKS, start=1):
        for name, index in convs:
            key = key_of(block, index)
            rules.append(
                Rule(f"{key}.weight", ("vgg", name, "kernel"), conv_to_flax, conv_to_torch)
            )
            rules.append(Rule(f"{key}.bias", ("vgg", name, "bias")))
    return rules


def _head_rules() -> list[Rule]:
    """Rule table for the LPIPS ``vgg.pth`` file (the five linear heads)."""
    return [
        Rule(f"lin{k}.model.1.weight", (f"lin{k}", "kernel"), conv_to_flax, conv_to_torch)
        for k in range(len(CHANNELS))
    ]


def _scaling_rules() -> list[Rule]:
    # Fixed buffers: checked on import, written on export.
    return [
        Rule("scaling_layer.shift", None, constant=SHIFT.reshape(1, 3, 1, 1)),
        Rule("scaling_layer.scale", None, constant=SCALE.reshape(1, 3, 1, 1)),
    ]


def _torchvision_rules() -> list[Rule]:
    """Rule table for torchvision's ``vgg16`` state dict (``features.*`` only)."""
    return _trunk_rules(lambda block, index: f"features.{index}")


def torch_rules(model: LPIPS | None = None) -> list[Rule]:
    """Rule table for a whole taming / upstream ``LPIPS`` state dict."""
    del model  # one layout for every LPIPS(dtype=...)
    taming_key = lambda block, index: f"net.slice{block}.{index}"
    return _scaling_rules() + _trunk_rules(taming_key) + _head_rules()


def abstract_params(model: LPIPS | None = None) -> dict:
    """The parameter tree as unboxed ShapeDtypeStructs (nothing allocated)."""
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)  # the smallest passing 4 pools
    return abstract_variables(LPIPS() if model is None else model, x, x)


def params_from_torch(source: Source, model: LPIPS | None = None) -> dict:
    """Whole-module ``LPIPS`` state dict (a file or a mapping) -> Flax params.

    Accepts the bare module keys (``scaling_layer.*``, ``net.slice{b}.{i}.*``,
    ``lin{k}.model.1.weight``) or a full VA-VAE training checkpoint, from which only the
    ``loss.perceptual_loss.*`` entries are taken. Raises `ConversionError` listing every
    missing, unexpected or mis-shaped key, and scaling buffers that differ from the constants.
    """
    state_dict = load_state_dict(source, select=("state_dict",), under=CHECKPOINT_PREFIX)
    return to_flax(state_dict, torch_rules(model), abstract_params(model), what="LPIPS",
                   source=source_name(source))


def params_from_torchvision(
    vgg16: Source,
    heads: Source,
    model: LPIPS | None = None,
    *,
    sources: tuple[str, str] | None = None,
) -> dict:
    """The two downloadable files (paths or mappings) -> Flax params.

    Args:
      vgg16: torchvision ``vgg16`` ImageNet weights, ``vgg16-397923af.pth`` (``features.*``;
        the ``classifier.*`` entries are ignored).
      heads: LPIPS ``vgg.pth`` (``lin{0..4}.model.1.weight``).
      sources: names of the two inputs for error messages (default: their paths).
    """
    names = sources or (source_name(vgg16), source_name(heads))
    shapes = abstract_params(model)
    trunk = to_flax(
        load_state_dict(vgg16),
        _torchvision_rules(),
        {"vgg": shapes["vgg"]},
        what="LPIPS VGG16 trunk",
        source=names[0],
        ignore=lambda k: k.startswith("classifier."),
    )
    head_shapes = {k: v for k, v in shapes.items() if k != "vgg"}
    lin = to_flax(load_state_dict(heads), _head_rules(), head_shapes, what="LPIPS linear heads",
                  source=names[1])
    return {**trunk, **lin}


def params_to_torch(
    params: Mapping, model: LPIPS | None = None, *, prefix: str = ""
) -> dict[str, np.ndarray]:
    """Flax params -> whole-module ``LPIPS`` state dict (numpy), keys optionally prefixed
    (``prefix="loss.perceptual_loss."`` for a VA-VAE training checkpoint)."""
    state_dict = to_torch(nn.unbox(params), torch_rules(model), what="LPIPS")
    return {prefix + k: v for k, v in state_dict.items()}
