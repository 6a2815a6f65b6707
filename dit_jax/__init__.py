"""LightningDiT in JAX/Flax: model, flow-matching transport, samplers, PyTorch conversion."""

from dit_jax.guidance import apply_guidance
from dit_jax.model import (
    RELEASED_FLAGS,
    VARIANTS,
    FinalLayer,
    LightningDiT,
    LightningDiTBlock,
    count_params,
    lightningdit_kwargs,
)

__all__ = [
    "RELEASED_FLAGS",
    "VARIANTS",
    "FinalLayer",
    "LightningDiT",
    "LightningDiTBlock",
    "apply_guidance",
    "count_params",
    "lightningdit_kwargs",
]
