"""VA-VAE in JAX/Flax: autoencoder, frozen DINOv2, LPIPS, PatchGAN, VF loss, train steps."""

from vavae_jax.autoencoder import AutoencoderKL, decode_to_uint8
from vavae_jax.dinov2 import DinoV2, dinov2_model, foundation_features
from vavae_jax.discriminator import NLayerDiscriminator
from vavae_jax.distributions import DiagonalGaussian
from vavae_jax.lpips import LPIPS

__all__ = [
    "LPIPS",
    "AutoencoderKL",
    "DiagonalGaussian",
    "DinoV2",
    "NLayerDiscriminator",
    "decode_to_uint8",
    "dinov2_model",
    "foundation_features",
]
