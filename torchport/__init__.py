"""Helpers for moving weights between upstream PyTorch state dicts and Flax parameter trees.

Shared by `dit_jax.convert` and `vavae_jax.convert`:

- `load_state_dict` reads a `.pt`/`.pth`/`.ckpt` (``torch.load(weights_only=True)``), a
  `.safetensors`, an `.npz` or an in-memory mapping into ``{key: np.ndarray}``.
- `save_state_dict` writes such a mapping back as `.pt` (torch tensors) or `.safetensors`.
- `Rule` / `to_flax` / `to_torch` apply a table of per-key layout transforms, and raise
  `ConversionError` naming every unknown, missing and mis-shaped key at once.
"""

from torchport.layouts import (
    conv_to_flax,
    conv_to_torch,
    identity,
    linear_to_flax,
    linear_to_torch,
)
from torchport.rules import ConversionError, Rule, expected_torch_shapes, to_flax, to_torch
from torchport.state_dict import (
    load_state_dict,
    read_checkpoint,
    save_state_dict,
    source_name,
    strip_prefixes,
)

__all__ = [
    "ConversionError",
    "Rule",
    "conv_to_flax",
    "conv_to_torch",
    "expected_torch_shapes",
    "identity",
    "linear_to_flax",
    "linear_to_torch",
    "load_state_dict",
    "read_checkpoint",
    "save_state_dict",
    "source_name",
    "strip_prefixes",
    "to_flax",
    "to_torch",
]
