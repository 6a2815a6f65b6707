"""Reading and writing upstream state dicts as ``{key: np.ndarray}``.

torch is imported lazily: only `.pt`-style files and torch tensors need it.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
DEFAULT_WRAPPERS = ("module.", "_orig_mod.")  # DDP and torch.compile


class CheckpointFileError(ValueError):
    """A weights file that cannot be read: an unknown suffix, or contents that are not what
    the suffix says."""


class UnsafeCheckpointError(CheckpointFileError):
    """A `.pt` file that only a full unpickler (able to run code) could read."""


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
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            try:
                return load_file(path)
            except (TypeError, ValueError):  # bfloat16 entries: numpy cannot hold them
                from safetensors.torch import load_file as load_torch

                return load_torch(path)
        except SafetensorError as e:
            raise CheckpointFileError(f"could not read {path} as safetensors: {e}") from e
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise CheckpointFileError(f"could not read {path} as an .npz archive: {e}") from e
    if path.endswith(TORCH_SUFFIXES):
        import pickle

        import torch

        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            if not found:  # not a pickle at all (a text file, a truncated download)
                reason = re.search(r"Unpickler error:\s*(.+?)(\n\n|$)", str(e), re.S)
                raise CheckpointFileError(
                    f"could not read {path} with torch.load(weights_only=True): not a torch "
                    f"checkpoint ({reason.group(1).strip() if reason else 'unpickling failed'})"
                ) from e
            raise UnsafeCheckpointError(
                f"refusing to unpickle {path}: it holds a Python object ({found.group(1)}); "
                "checkpoints are read with torch.load(weights_only=True), which never runs "
                "code from a file. If you trust it, load it yourself with weights_only=False "
                "and re-save its tensors as a plain dict or a .safetensors file") from e
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise CheckpointFileError(
                f"could not read {path} with torch.load(weights_only=True): {e}"
            ) from e
    raise CheckpointFileError(
        f"unsupported checkpoint format: {path} "
        f"(expected one of {', '.join(TORCH_SUFFIXES)}, .safetensors, .npz)"
    )


def source_name(source: Any) -> str:
    """How error messages name a checkpoint source: its path, or "state dict" for a mapping."""
    return os.fspath(source) if isinstance(source, str | os.PathLike) else "state dict"


def strip_prefixes(
    state_dict: Mapping[str, Any],
    prefixes: Sequence[str] = DEFAULT_WRAPPERS,
    under: str | None = None,
) -> dict[str, Any]:
    """Normalise key names in two steps.

    1. Remove wrapper `prefixes` from the start of every key, repeatedly and in any order
       (``module._orig_mod.x`` -> ``x``).
    2. With `under` (a sub-module's prefix, e.g. ``"loss.discriminator."``): when any key
       starts with it, keep only those keys, with `under` removed; when none does, keep
       everything (the state dict is taken to be the bare sub-module's already).
    """
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for p in prefixes:
                if key.startswith(p):
                    key, stripped = key[len(p) :], True
        out[key] = value
    if under and any(k.startswith(under) for k in out):
        out = {k[len(under) :]: v for k, v in out.items() if k.startswith(under)}
    return out


def load_state_dict(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    select: Sequence[str] = (),
    under: str | None = None,
) -> dict[str, np.ndarray]:
    """Load a state dict from a file or a mapping, as ``{key: np.ndarray}``.

    Args:
      source: a path (`.pt`/`.pth`/`.ckpt`/`.bin` via ``torch.load(weights_only=True)``,
        `.safetensors`, `.npz`) or a mapping of key -> array / torch tensor.
      select: candidate top-level entries of a training checkpoint, tried in order; the first
        one that is present and is itself a mapping is used (e.g. ``("ema", "model")`` for
        LightningDiT checkpoints, ``("state_dict",)`` for Lightning checkpoints).
      under: a sub-module's key prefix, see `strip_prefixes`.

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
    return strip_prefixes(arrays, under=under)


def to_torch_tensor(array: np.ndarray):
    """A numpy array as a torch tensor of the same dtype; bfloat16 (ml_dtypes, which
    ``torch.from_numpy`` refuses) becomes ``torch.bfloat16`` bit for bit."""
    import torch

    array = np.asarray(array, order="C")
    if not array.flags.writeable:
        array = array.copy()
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def save_state_dict(
    path: str | os.PathLike, state_dict: Mapping[str, np.ndarray], *, wrap_key: str | None = None
) -> None:
    """Write ``{key: array}`` as `.safetensors` or a torch `.pt` (optionally ``{wrap_key: sd}``)."""
    path = os.fspath(path)
    # np.asarray keeps 0-d entries (BatchNorm counters) 0-d; ascontiguousarray would not
    arrays = {k: np.asarray(v, order="C") for k, v in state_dict.items()}
    if path.endswith(".safetensors"):
        if wrap_key is not None:
            raise ValueError("safetensors files are flat; wrap_key is only for .pt files")
        from safetensors.numpy import save_file

        save_file(arrays, path)
        return
    if not path.endswith(TORCH_SUFFIXES):
        raise ValueError(f"unsupported output format: {path} (use .pt or .safetensors)")
    import torch

    tensors = {k: to_torch_tensor(v) for k, v in arrays.items()}
    torch.save({wrap_key: tensors} if wrap_key else tensors, path)
