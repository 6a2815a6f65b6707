"""The Flax variables a model would create, as shapes only (nothing allocated or computed)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
from flax import linen as nn


def abstract_variables(
    model: nn.Module,
    *example_inputs: Any,
    collections: str | Sequence[str] = "params",
    **init_kwargs: Any,
) -> Any:
    """Unboxed `jax.ShapeDtypeStruct`s of ``model.init(rng, *example_inputs, **init_kwargs)``.

    Args:
      model: a Linen module.
      example_inputs: arrays or ShapeDtypeStructs of any size the model accepts (the smallest
        one keeps tracing cheap); only their shapes and dtypes are read.
      collections: one collection name -> that collection's tree; a sequence of names ->
        ``{name: tree}`` (e.g. ``("params", "batch_stats")``).
      init_kwargs: static keyword arguments of the call (``train=False``, ...).
    """
    init = functools.partial(model.init, **init_kwargs)
    variables = nn.meta.unbox(jax.eval_shape(init, jax.random.key(0), *example_inputs))
    if isinstance(collections, str):
        return variables[collections]
    return {name: variables[name] for name in collections}
