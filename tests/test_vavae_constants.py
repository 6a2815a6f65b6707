"""SPEC section 12 shape constants of the full-size VA-VAE parts (shape evaluation only)."""

import jax
import jax.numpy as jnp

from vavae_jax import AutoencoderKL, NLayerDiscriminator, dinov2_model


def _shapes(fn, *args):
    return jax.eval_shape(fn, *args)


def test_f16d32_latent_and_moment_shapes():
    ae = AutoencoderKL(embed_dim=32)
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    variables = _shapes(lambda x: ae.init({"params": jax.random.key(0),
                                           "sample": jax.random.key(1)}, x), x)
    moments = _shapes(lambda v, x: ae.apply(v, x, method=lambda m, x: m.quant_conv(m.encoder(x))),
                      variables, x)
    assert moments.shape == (2, 16, 16, 64)
    posterior = _shapes(lambda v, x: ae.apply(v, x, method=AutoencoderKL.encode), variables, x)
    assert posterior.mean.shape == (2, 16, 16, 32)
    z = jax.ShapeDtypeStruct((2, 16, 16, 32), jnp.float32)
    assert _shapes(lambda v, z: ae.apply(v, z, method=AutoencoderKL.decode),
                   variables, z).shape == (2, 256, 256, 3)


def test_dinov2_tokens_and_discriminator_logits():
    vit = dinov2_model("L")
    x224 = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    variables = _shapes(lambda x: vit.init(jax.random.key(0), x), x224)
    assert _shapes(vit.apply, variables, x224).shape == (2, 257, 1024)  # CLS + 16x16 patches
    disc = NLayerDiscriminator()
    x256 = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    dvars = _shapes(lambda x: disc.init(jax.random.key(0), x, train=False), x256)
    assert _shapes(lambda v, x: disc.apply(v, x, train=False), dvars, x256).shape == (
        2, 30, 30, 1)
