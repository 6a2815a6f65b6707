"""Reading and writing upstream state dicts as ``{key: np.ndarray}``.

torch is imported lazily: only `.pt`-style files and torch tensors need it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch"):
        import torch

        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; widening is exact
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(value)


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def read_checkpoint(path: str) -> Mapping[str, Any]:
    """A checkpoint file's top-level mapping as saved (tensors, nested dicts, optimizer state)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except (TypeError, ValueError):  # bfloat16 entries: numpy cannot hold them
            from safetensors.torch import load_file as load_torch

            return load_torch(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if path.endswith(TORCH_SUFFIXES):
        import torch

        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(
                f"could not read {path} with torch.load(weights_only=True): {e}"
            ) from e
    raise ValueError(
        f"unsupported checkpoint format: {path} "
        f"(expected one of {', '.join(TORCH_SUFFIXES)}, .safetensors, .npz)"
    )


def source_name(source: Any) -> str:
    """How error messages name a checkpoint source: its path, or "state dict" for a mapping."""
    return os.fspath(source) if isinstance(source, str | os.PathLike) else "state dict"


def strip_prefixes(
    state_dict: Mapping[str, Any], prefixes: Sequence[str] = ("module.", "_orig_mod.")
) -> dict[str, Any]:
    """Remove DDP / torch.compile wrappers' key prefixes (repeatedly, in any order)."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for p in prefixes:
                if key.startswith(p):
                    key, stripped = key[len(p) :], True
        out[key] = value
    return out


def load_state_dict(
    source: str | os.PathLike | Mapping[str, Any], *, select: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """Load a state dict from a file or a mapping, as ``{key: np.ndarray}``.

    Args:
      source: a path (`.pt`/`.pth`/`.ckpt`/`.bin` via ``torch.load(weights_only=True)``,
        `.safetensors`, `.npz`) or a mapping of key -> array / torch tensor.
      select: candidate top-level entries of a training checkpoint, tried in order; the first
        one that is present and is itself a mapping is used (e.g. ``("ema", "model")`` for
        LightningDiT checkpoints, ``("state_dict",)`` for Lightning checkpoints).

    Non-array entries (optimizer state, configs, step counters) are dropped; `module.` and
    `_orig_mod.` prefixes are stripped.
    """
    name = source_name(source)
    raw = read_checkpoint(name) if isinstance(source, str | os.PathLike) else source
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"{name}: expected a mapping of names to tensors, got {type(raw).__name__}")
    for key in select:
        if isinstance(raw.get(key), Mapping):
            raw = raw[key]
            break
    arrays = {k: _to_numpy(v) for k, v in raw.items() if _is_array(v)}
    if not arrays:
        raise ValueError(
            f"{name}: no tensors found (top-level keys: {sorted(map(str, raw))[:20]}; "
            f"looked inside: {list(select)})"
        )
    return strip_prefixes(arrays)


def save_state_dict(
    path: str | os.PathLike, state_dict: Mapping[str, np.ndarray], *, wrap_key: str | None = None
) -> None:
    """Write ``{key: array}`` as `.safetensors` or a torch `.pt` (optionally ``{wrap_key: sd}``)."""
    path = os.fspath(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    if path.endswith(".safetensors"):
        if wrap_key is not None:
            raise ValueError("safetensors files are flat; wrap_key is only for .pt files")
        from safetensors.numpy import save_file

        save_file(arrays, path)
        return
    if not path.endswith(TORCH_SUFFIXES):
        raise ValueError(f"unsupported output format: {path} (use .pt or .safetensors)")
    import torch

    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    torch.save({wrap_key: tensors} if wrap_key else tensors, path)
