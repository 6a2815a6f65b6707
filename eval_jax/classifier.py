"""A small image classifier whose penultimate features stand in for Inception's.

The demo trains it on procedural images it never shows the generative models, then scores
samples with it: the share assigned to the requested class, and the Frechet distance of its
features (as FID uses Inception's pool3). Pure model, no I/O; `launch.demo` trains it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn


class SmallClassifier(nn.Module):
    """uint8 images (B, H, W, 3) -> {'pool': (B, features), 'logits': (B, num_classes)}."""

    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)
    features: int = 64

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        x = images.astype(jnp.float32) / 127.5 - 1.0
        for i, width in enumerate(self.widths):
            x = nn.relu(nn.Conv(width, (3, 3), name=f"conv{i}")(x))
            if i < len(self.widths) - 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
        pool = nn.relu(nn.Dense(self.features, name="features")(x))
        return {"pool": pool, "logits": nn.Dense(self.num_classes, name="head")(pool)}
