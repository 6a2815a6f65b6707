"""Helpers for moving weights between upstream PyTorch state dicts and Flax parameter trees.

Every converter module (`dit_jax.convert`, `vavae_jax.convert`, `vavae_jax.dinov2_convert`,
`vavae_jax.lpips`, `vavae_jax.discriminator`, `eval_jax.inception_convert`,
`launch.latent_stats`) is built from these and exposes the same four functions::

    torch_rules(model, **options) -> list[Rule]          # one rule per upstream key
    abstract_params(model) -> tree                       # ShapeDtypeStructs, nothing allocated
    params_from_torch(source, model, **options) -> tree  # source: a path or a mapping
    params_to_torch(tree, model, **options) -> {key: np.ndarray}

- `load_state_dict` reads a `.pt`/`.pth`/`.ckpt` (``torch.load(weights_only=True)``), a
  `.safetensors`, an `.npz` or an in-memory mapping into ``{key: np.ndarray}``;
  `strip_prefixes` normalises key names (wrappers, a sub-module's prefix).
- `save_state_dict` writes such a mapping back as `.pt` (torch tensors) or `.safetensors`.
- `abstract_variables` gives a model's variables as shapes, via ``jax.eval_shape``.
- `Rule` / `to_flax` / `to_torch` apply a table of per-key layout transforms, and raise
  `ConversionError` naming every unknown, missing and mis-shaped key at once.
"""

from torchport.abstract import abstract_variables
from torchport.layouts import (
    conv_to_flax,
    conv_to_torch,
    identity,
    linear_to_flax,
    linear_to_torch,
)
from torchport.rules import ConversionError, Rule, expected_torch_shapes, to_flax, to_torch
from torchport.state_dict import (
    TORCH_SUFFIXES,
    CheckpointFileError,
    UnsafeCheckpointError,
    load_state_dict,
    read_checkpoint,
    save_state_dict,
    source_name,
    strip_prefixes,
    to_torch_tensor,
)

__all__ = [
    "TORCH_SUFFIXES",
    "CheckpointFileError",
    "ConversionError",
    "Rule",
    "UnsafeCheckpointError",
    "abstract_variables",
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
    "to_torch_tensor",
]
