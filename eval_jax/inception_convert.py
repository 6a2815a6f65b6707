"""pytorch-fid Inception weights <-> `eval_jax.inception.InceptionV3` variables.

Where the weights come from: pytorch-fid downloads
``https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth``
(``pytorch_fid.inception.FID_WEIGHTS_URL``; cached by torch hub under
``~/.cache/torch/hub/checkpoints/``), the 2015-12-05 TensorFlow Inception graph's constants in
torchvision's key names. Pass that file (or any state dict) to `params_from_torch`.

Two key layouts are accepted (``layout=`` or detected from the keys):

* ``'fid_inception'``: the ``.pth`` file above, = ``fid_inception_v3().state_dict()``:
  ``Conv2d_1a_3x3.conv.weight``, ``Conv2d_1a_3x3.bn.{weight,bias,running_mean,running_var}``,
  ..., ``Mixed_7c.branch_pool.bn.running_var``, ``fc.weight`` (1008, 2048), ``fc.bias``.
* ``'pytorch_fid'``: ``pytorch_fid.inception.InceptionV3([3]).state_dict()``, the same layers
  wrapped in ``blocks``, a ModuleList of four Sequentials whose max pools hold no weights:
  ``blocks.0.{0,1,2}`` = Conv2d_1a/2a/2b, ``blocks.1.{0,1}`` = Conv2d_3b/4a,
  ``blocks.2.{0..7}`` = Mixed_5b..Mixed_6e, ``blocks.3.{0,1,2}`` = Mixed_7a..7c. That module keeps
  no ``fc``, so it loads into ``InceptionV3(num_classes=0)`` (the default for this layout) and
  gives no logits.

Per layer (BasicConv2d ``<name>``): ``<name>.conv.weight`` (out, in, kh, kw) <->
``params/<path>/conv/kernel`` (kh, kw, in, out); ``<name>.bn.weight`` / ``.bias`` <->
``params/<path>/bn/scale`` / ``bias``; ``<name>.bn.running_mean`` / ``running_var`` <->
``batch_stats/<path>/bn/mean`` / ``var``, where <path> splits <name> at its dots. ``fc.weight``
(out, in) <-> ``params/fc/kernel`` (in, out). ``<name>.bn.num_batches_tracked`` counters are
ignored on import (BatchNorm never reads them in eval mode) and, by default, written back as int64
zeros on export (PyTorch puts them in every ``BatchNorm2d`` state dict).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from eval_jax.inception import RESOLUTION, InceptionV3
from torchport import (
    ConversionError,
    Rule,
    abstract_variables,
    conv_to_flax,
    conv_to_torch,
    linear_to_flax,
    linear_to_torch,
    load_state_dict,
    source_name,
    to_flax,
    to_torch,
)

WHAT = "FID InceptionV3"
LAYOUTS = ("fid_inception", "pytorch_fid")

# The BasicConv2d layers of each block type, in PyTorch registration (= state dict) order.
_BRANCHES = {
    "A": ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3", "branch_pool"),
    "B": ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
    "C": ("branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1",
          "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"),
    "D": ("branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3",
          "branch7x7x3_4"),
    "E": ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
          "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"),
}

# Top-level layers in order: (torchvision name, block type or None for a single BasicConv2d,
# key prefix inside pytorch-fid's InceptionV3 module).
_LAYERS = (
    ("Conv2d_1a_3x3", None, "blocks.0.0"),
    ("Conv2d_2a_3x3", None, "blocks.0.1"),
    ("Conv2d_2b_3x3", None, "blocks.0.2"),
    ("Conv2d_3b_1x1", None, "blocks.1.0"),
    ("Conv2d_4a_3x3", None, "blocks.1.1"),
    ("Mixed_5b", "A", "blocks.2.0"),
    ("Mixed_5c", "A", "blocks.2.1"),
    ("Mixed_5d", "A", "blocks.2.2"),
    ("Mixed_6a", "B", "blocks.2.3"),
    ("Mixed_6b", "C", "blocks.2.4"),
    ("Mixed_6c", "C", "blocks.2.5"),
    ("Mixed_6d", "C", "blocks.2.6"),
    ("Mixed_6e", "C", "blocks.2.7"),
    ("Mixed_7a", "D", "blocks.3.0"),
    ("Mixed_7b", "E", "blocks.3.1"),
    ("Mixed_7c", "E", "blocks.3.2"),
)

_COUNTER = ".bn.num_batches_tracked"


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown Inception layout {layout!r}; expected one of {LAYOUTS}")


def _basic_conv_rules(key: str, path: tuple[str, ...]) -> list[Rule]:
    """conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var of one BasicConv2d."""
    return [
        Rule(f"{key}.conv.weight", ("params", *path, "conv", "kernel"), conv_to_flax,
             conv_to_torch),
        Rule(f"{key}.bn.weight", ("params", *path, "bn", "scale")),
        Rule(f"{key}.bn.bias", ("params", *path, "bn", "bias")),
        Rule(f"{key}.bn.running_mean", ("batch_stats", *path, "bn", "mean")),
        Rule(f"{key}.bn.running_var", ("batch_stats", *path, "bn", "var")),
    ]


def torch_rules(model: InceptionV3 | None = None, layout: str = "fid_inception") -> list[Rule]:
    """The conversion table, in the upstream state-dict order (without the BatchNorm counters).

    Flax paths start with the collection: ``('params', ...)`` or ``('batch_stats', ...)``.
    ``fc.*`` is included when ``model.num_classes`` is not 0.
    """
    _check_layout(layout)
    model = InceptionV3() if model is None else model
    rules = []
    for name, kind, module_prefix in _LAYERS:
        prefix = module_prefix if layout == "pytorch_fid" else name
        if kind is None:
            rules += _basic_conv_rules(prefix, (name,))
        else:
            for branch in _BRANCHES[kind]:
                rules += _basic_conv_rules(f"{prefix}.{branch}", (name, branch))
    if model.num_classes:
        rules += [
            Rule("fc.weight", ("params", "fc", "kernel"), linear_to_flax, linear_to_torch),
            Rule("fc.bias", ("params", "fc", "bias")),
        ]
    return rules


def abstract_params(model: InceptionV3 | None = None) -> dict:
    """``{'params': ..., 'batch_stats': ...}`` of `model` as `jax.ShapeDtypeStruct`s (nothing
    is allocated)."""
    model = InceptionV3() if model is None else model
    x = jax.ShapeDtypeStruct((1, RESOLUTION, RESOLUTION, 3), jnp.float32)
    return abstract_variables(model, x, collections=("params", "batch_stats"))


def _flax_shapes(model: InceptionV3, rules: list[Rule]) -> dict[tuple[str, ...], Any]:
    shapes = traverse_util.flatten_dict(abstract_params(model))
    covered = {r.flax_path for r in rules}
    if covered != set(shapes):  # the table and the modules disagree: a bug here, not in the input
        raise AssertionError(f"rule table vs Flax tree: {sorted(covered ^ set(shapes))[:10]}")
    return shapes


def detect_layout(keys) -> str:
    """'pytorch_fid' when the keys carry the ``blocks.`` prefix of pytorch-fid's InceptionV3
    module, else 'fid_inception'."""
    return "pytorch_fid" if any(k.startswith("blocks.") for k in keys) else "fid_inception"


def params_from_torch(
    source: str | os.PathLike | Mapping[str, Any],
    model: InceptionV3 | None = None,
    *,
    layout: str | None = None,
) -> dict:
    """Load pytorch-fid Inception weights as the variables of `model`.

    Args:
      source: ``pt_inception-2015-12-05-6726825d.pth`` or any `.pth` / `.pt` / `.safetensors`
        file (read with `torchport.load_state_dict`, i.e. ``torch.load(weights_only=True)``), or
        a mapping of key -> array / torch tensor.
      model: the target `InceptionV3`; default ``InceptionV3()`` for the 'fid_inception' layout
        and ``InceptionV3(num_classes=0)`` for 'pytorch_fid' (which has no ``fc``).
      layout: 'fid_inception' or 'pytorch_fid' (module docstring); detected from the keys if None.

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` of float32 numpy arrays, for
      ``model.apply(variables, images)``.

    Raises:
      ConversionError naming the source and every missing, unexpected or mis-shaped key (with
      the expected and the found shape). ``*.num_batches_tracked`` entries are ignored.
    """
    name = source_name(source)
    state_dict = load_state_dict(source, select=("state_dict",))
    layout = layout or detect_layout(state_dict)
    _check_layout(layout)
    if model is None:
        model = InceptionV3(num_classes=0) if layout == "pytorch_fid" else InceptionV3()
    elif layout == "pytorch_fid" and model.num_classes:
        raise ConversionError(
            f"cannot load {name} into {WHAT}: pytorch-fid's InceptionV3 module state dict has no "
            f"fc layer; load it into InceptionV3(num_classes=0), or load the "
            f"pt_inception-2015-12-05 .pth file (which has fc) instead"
        )
    rules = torch_rules(model, layout)
    state_dict = {
        k: v if k.endswith(_COUNTER) else np.asarray(v, np.float32) for k, v in state_dict.items()
    }
    variables = to_flax(
        state_dict,
        rules,
        _flax_shapes(model, rules),
        what=f"{WHAT} ({layout} layout)",
        source=name,
        ignore=lambda k: k.endswith(_COUNTER),
    )
    return jax.tree.map(lambda a: np.asarray(a, np.float32), variables)


def params_to_torch(
    variables: Mapping,
    model: InceptionV3 | None = None,
    *,
    layout: str = "fid_inception",
    num_batches_tracked: bool = True,
) -> dict[str, np.ndarray]:
    """``{'params', 'batch_stats'}`` -> upstream state dict (float32 numpy, upstream order).

    `model` defaults to ``InceptionV3(num_classes=0 if there is no 'fc' else 1008)``. With
    `num_batches_tracked`, each BatchNorm's ``num_batches_tracked`` is written as an int64 zero
    after its ``running_var``, as in a PyTorch ``state_dict()``; pass False to reproduce files
    without them. ``layout='pytorch_fid'`` needs a tree without ``fc``.
    """
    _check_layout(layout)
    collections = ("params", "batch_stats")
    variables = {k: nn.meta.unbox(v) for k, v in variables.items() if k in collections}
    if model is None:
        has_fc = "fc" in variables.get("params", {})
        model = InceptionV3() if has_fc else InceptionV3(num_classes=0)
    if layout == "pytorch_fid" and model.num_classes:
        raise ConversionError(
            f"{WHAT}: pytorch-fid's InceptionV3 module has no fc layer; drop params['fc'] (or "
            f"pass model=InceptionV3(num_classes=0)) to export in the 'pytorch_fid' layout"
        )
    converted = to_torch(variables, torch_rules(model, layout), what=WHAT)
    out = {}
    for key, value in converted.items():
        out[key] = np.asarray(value, np.float32)
        if num_batches_tracked and key.endswith(".bn.running_var"):
            out[key[: -len(".running_var")] + ".num_batches_tracked"] = np.zeros((), np.int64)
    return out


__all__ = [
    "ConversionError",
    "LAYOUTS",
    "abstract_params",
    "detect_layout",
    "params_from_torch",
    "params_to_torch",
    "torch_rules",
]
