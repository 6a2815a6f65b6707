"""Classifier-free guidance with a guidance interval and an optional channel restriction."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_guidance(
    cond: jax.Array,
    uncond: jax.Array,
    t: jax.Array,
    *,
    cfg_scale: float,
    cfg_interval_start: float = 0.0,
    cfg_channels: int | None = None,
) -> jax.Array:
    """Combine conditional and unconditional velocities (B, H, W, C) at times t (B,).

    ``uncond + cfg_scale * (cond - uncond)``, used only where ``t >= cfg_interval_start``
    (t = 0 is noise, so the interval switches guidance off for the noisiest steps); elsewhere
    the conditional velocity. With `cfg_channels=k` only the first k latent channels are guided
    and the rest follow the conditional velocity: upstream LightningDiT guides channels 0..2
    only (``cfg_channels=3``), which the released FIDs depend on. None guides every channel.
    """
    guided = uncond + cfg_scale * (cond - uncond)
    if cfg_channels is not None:
        guided = jnp.concatenate([guided[..., :cfg_channels], cond[..., cfg_channels:]], axis=-1)
    active = (t >= cfg_interval_start).reshape((-1,) + (1,) * (cond.ndim - 1))
    return jnp.where(active, guided, cond)
