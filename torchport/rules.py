"""Key-by-key conversion tables between upstream state dicts and Flax parameter trees.

A converter describes a model as a list of rules:

- `Rule(torch_key, flax_path, to_flax_fn, to_torch_fn)`: one state-dict entry <-> one Flax leaf.
- `Rule(torch_key, None, constant=array)`: an upstream entry that this port computes instead of
  storing (fixed sin-cos position tables, RoPE buffers). Exporting writes the constant; importing
  checks that the checkpoint holds the same values.

`to_flax` validates the whole state dict before converting anything and raises one
`ConversionError` that lists every missing, unexpected, mis-shaped or mismatching key.
`to_torch` of an abstract tree (ShapeDtypeStruct leaves) gives the upstream shapes without
allocating: ``params_to_torch(abstract_params(model), model)`` is the layout check against a
manifest of the upstream `state_dict()`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from torchport.layouts import identity

_MAX_LISTED = 25


class ConversionError(ValueError):
    """A state dict does not match the layout the converter expects."""


@dataclasses.dataclass(frozen=True)
class Rule:
    torch_key: str
    flax_path: tuple[str, ...] | None
    to_flax_fn: Callable[[Any], Any] = identity
    to_torch_fn: Callable[[Any], Any] = identity
    constant: np.ndarray | None = None
    constant_atol: float = 1e-5

    def __post_init__(self):
        if (self.flax_path is None) == (self.constant is None):
            raise ValueError(f"rule {self.torch_key!r}: give exactly one of flax_path / constant")


def _shape_of(leaf) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(leaf))  # np.shape reads `.shape` when there is one


def expected_torch_shapes(
    rules: Iterable[Rule], flax_shapes: Mapping[tuple[str, ...], Any]
) -> dict[str, tuple[int, ...]]:
    """Torch-side shape of every rule, derived from the Flax-side shapes without allocating."""
    out = {}
    for rule in rules:
        if rule.constant is not None:
            out[rule.torch_key] = tuple(rule.constant.shape)
            continue
        leaf = flax_shapes[rule.flax_path]
        abstract = jax.ShapeDtypeStruct(_shape_of(leaf), np.float32)
        out[rule.torch_key] = tuple(jax.eval_shape(rule.to_torch_fn, abstract).shape)
    return out


def _flat(tree: Mapping) -> Mapping[tuple[str, ...], Any]:
    """A nested Flax tree, or one already flat (tuple keys), as ``{path: leaf}``."""
    if tree and all(isinstance(k, tuple) for k in tree):
        return tree
    return traverse_util.flatten_dict(dict(tree))


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


def to_flax(
    state_dict: Mapping[str, np.ndarray],
    rules: list[Rule],
    flax_shapes: Mapping[tuple[str, ...], Any],
    *,
    what: str,
    source: str = "state dict",
    ignore: Callable[[str], bool] | None = None,
) -> dict:
    """Convert `state_dict` into a nested Flax tree following `rules`.

    Args:
      state_dict: upstream key -> array (numpy or anything `np.asarray` accepts).
      rules: the model's conversion table.
      flax_shapes: the expected Flax tree (nested, or flat by path) of arrays or
        ShapeDtypeStructs, e.g. the converter's `abstract_params(model)`.
      what: model name for error messages.
      source: where the state dict came from (a file name), for error messages.
      ignore: predicate for keys that may be present and are dropped silently.
    """
    flax_shapes = _flat(flax_shapes)
    by_key = {r.torch_key: r for r in rules}
    expected = expected_torch_shapes(rules, flax_shapes)
    present = {k for k in state_dict if not (ignore and ignore(k))}

    missing = sorted(set(by_key) - present)
    unexpected = sorted(present - set(by_key))
    mis_shaped, mismatched = [], []
    for key in sorted(present & set(by_key)):
        got = _shape_of(state_dict[key])
        if got != expected[key]:
            mis_shaped.append(f"{key}: got {got}, expected {expected[key]}")
            continue
        rule = by_key[key]
        if rule.constant is not None:
            diff = float(np.max(np.abs(np.asarray(state_dict[key], np.float64) - rule.constant)))
            if not diff <= rule.constant_atol:
                mismatched.append(
                    f"{key}: max |diff| {diff:.3g} from the fixed table this port computes "
                    f"(tolerance {rule.constant_atol:g})"
                )

    if missing or unexpected or mis_shaped or mismatched:
        parts = [f"cannot load {source} into {what}:"]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if mis_shaped:
            parts.append(_listing("shape mismatches (PyTorch layout)", mis_shaped))
        if mismatched:
            parts.append(_listing("constant tables that differ", mismatched))
        raise ConversionError("\n".join(parts))

    flat = {}
    for rule in rules:
        if rule.flax_path is None:
            continue
        value = np.asarray(rule.to_flax_fn(np.asarray(state_dict[rule.torch_key])))
        want = _shape_of(flax_shapes[rule.flax_path])
        if value.shape != want:  # a bug in the rule table, not in the input
            raise AssertionError(f"{rule.torch_key} -> {rule.flax_path}: {value.shape} != {want}")
        flat[rule.flax_path] = value
    return traverse_util.unflatten_dict(flat)


def to_torch(params: Mapping, rules: list[Rule], *, what: str) -> dict[str, Any]:
    """Convert a nested Flax tree into an upstream state dict (numpy arrays), in rule order.

    A tree of ShapeDtypeStructs gives ShapeDtypeStructs (the upstream shapes, nothing computed).
    """
    flat = traverse_util.flatten_dict(dict(params))
    abstract = any(isinstance(v, jax.ShapeDtypeStruct) for v in flat.values())
    used = set()
    out = {}
    for rule in rules:
        if rule.constant is not None:
            c = np.asarray(rule.constant, np.float32)
            out[rule.torch_key] = jax.ShapeDtypeStruct(c.shape, c.dtype) if abstract else c
            continue
        if rule.flax_path not in flat:
            raise ConversionError(f"{what}: Flax parameter {'/'.join(rule.flax_path)} is missing")
        leaf = flat[rule.flax_path]
        if abstract:
            out[rule.torch_key] = jax.eval_shape(rule.to_torch_fn, leaf)
        else:
            out[rule.torch_key] = np.asarray(rule.to_torch_fn(np.asarray(leaf)))
        used.add(rule.flax_path)
    leftover = sorted("/".join(p) for p in set(flat) - used)
    if leftover:
        raise ConversionError(
            f"{what}: Flax parameters with no PyTorch counterpart:\n"
            + _listing("unconverted parameters", leftover)
        )
    return out
