"""GAN objectives of the VA-VAE loss (taming ``vqperceptual``), as pure functions of logits.

Logits are discriminator outputs of any shape, e.g. (B, 30, 30, 1); every mean is over all
elements. The discriminator losses include upstream's factor 0.5; the schedule factor
(``disc_factor`` after ``disc_start``) is applied by the caller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def hinge_d_loss(logits_real: jnp.ndarray, logits_fake: jnp.ndarray) -> jnp.ndarray:
    """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))), a scalar."""
    loss_real = jnp.mean(jax.nn.relu(1.0 - logits_real))
    loss_fake = jnp.mean(jax.nn.relu(1.0 + logits_fake))
    return 0.5 * (loss_real + loss_fake)


def vanilla_d_loss(logits_real: jnp.ndarray, logits_fake: jnp.ndarray) -> jnp.ndarray:
    """Non-saturating logistic loss, 0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x_hat))))."""
    loss_real = jnp.mean(jax.nn.softplus(-logits_real))
    loss_fake = jnp.mean(jax.nn.softplus(logits_fake))
    return 0.5 * (loss_real + loss_fake)


def generator_loss(logits_fake: jnp.ndarray) -> jnp.ndarray:
    """Generator term -mean(D(x_hat)) (D in train mode, x_hat not detached)."""
    return -jnp.mean(logits_fake)


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
