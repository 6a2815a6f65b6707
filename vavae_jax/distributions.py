"""Diagonal Gaussian posterior of the VA-VAE encoder, as a JAX pytree.

All arrays are channels-last: ``mean`` and ``logvar`` are (B, h, w, C). Reductions (`kl`, `nll`)
sum over every non-batch axis and return one value per sample, shape (B,).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


@struct.dataclass
class DiagonalGaussian:
    """N(mean, exp(logvar)) per latent element; `logvar` is stored already clamped."""

    mean: jax.Array  # (B, h, w, C)
    logvar: jax.Array  # (B, h, w, C), in [LOGVAR_MIN, LOGVAR_MAX]

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """Split encoder moments (B, h, w, 2C): channels [0, C) = mean, [C, 2C) = logvar."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def _sum_per_sample(self, x: jax.Array) -> jax.Array:
        return jnp.sum(x, axis=tuple(range(1, x.ndim)))

    def sample_with_eps(self, eps: jax.Array) -> jax.Array:
        """Reparameterised sample mean + std * eps for given standard-normal noise eps."""
        return self.mean + self.std * eps

    def sample(self, rng: jax.Array) -> jax.Array:
        """A draw z ~ N(mean, var), shape (B, h, w, C)."""
        eps = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
        return self.sample_with_eps(eps)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> jax.Array:
        """KL(self || other) per sample, (B,); `other` defaults to the standard normal."""
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (
                jnp.square(self.mean - other.mean) / other.var
                + self.var / other.var
                - 1.0
                - self.logvar
                + other.logvar
            )
        return 0.5 * self._sum_per_sample(terms)

    def nll(self, x: jax.Array) -> jax.Array:
        """Negative log-likelihood of x (B, h, w, C) under this Gaussian, per sample, (B,)."""
        terms = math.log(2.0 * math.pi) + self.logvar + jnp.square(x - self.mean) / self.var
        return 0.5 * self._sum_per_sample(terms)
