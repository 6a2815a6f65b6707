"""Loading and saving parameter trees: orbax directories and upstream PyTorch files.

`load_params` accepts an orbax params directory (written by `save_params` or
`python -m launch.convert`) or anything the model's torch converter reads (.pt / .pth / .ckpt /
.safetensors). Parameters are placed with `shardings` straight from the file when given.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from launch.orbax_reads import AbandonedReads

METADATA_FILE = "_CHECKPOINT_METADATA"


class ItemMetadataNotice(logging.Filter):
    """Drops orbax's warning that a training run's params item (RUN/checkpoints/<step>/params)
    has no metadata file of its own: its CheckpointManager writes one per step, beside the
    items, and the restore goes on. The warning is kept for a directory that is no item of a
    step holding that file."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        prefix = "Metadata file does not exist: "
        if record.levelno != logging.WARNING or not message.startswith(prefix):
            return True
        missing = message[len(prefix):]
        step = os.path.dirname(os.path.dirname(missing))
        return not (os.path.basename(missing) == METADATA_FILE
                    and os.path.exists(os.path.join(step, METADATA_FILE)))


absl_logging.get_absl_logger().addFilter(ItemMetadataNotice())


def save_params(path: str | os.PathLike, params) -> None:
    """Write a params tree as an orbax checkpoint directory (`path` must not exist)."""
    path = os.path.abspath(os.fspath(path))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params)


MAX_LISTED = 8  # differences named in a mismatch error


def tree_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{'a/b/kernel': shape} of a tree of arrays, ShapeDtypeStructs or orbax metadata."""
    def name(path) -> str:
        return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {name(path): tuple(np.shape(leaf)) for path, leaf in leaves}


def check_tree(tree, abstract, where: str) -> None:
    """Raise a `UserError` naming the paths where `tree`'s shapes differ from the model's
    (`abstract`): missing, unexpected and mis-shaped entries."""
    from launch.cli import UserError

    got, want = tree_shapes(tree), tree_shapes(abstract)
    if not got:
        raise UserError(f"{where} holds no parameters (not an orbax params directory, a "
                        f"launch.train workdir or a converted upstream file?)")
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    reshaped = [k for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    if missing or unexpected or reshaped:
        problems = ([f"{k}: {got[k]}, expected {want[k]}" for k in reshaped]
                    + [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected])
        shown = "; ".join(problems[:MAX_LISTED])
        more = f"; ... {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        other = (" (no name in common: weights of another model?)"
                 if not set(got) & set(want) else "")
        raise UserError(f"the weights in {where} do not fit the configured model{other}: "
                        f"{len(reshaped)} of another shape, {len(missing)} missing, "
                        f"{len(unexpected)} unexpected ({shown}{more}); pass the --config (and "
                        f"options) they were made with")


def stored_tree(path: str | os.PathLike, ckptr):
    """The metadata tree of an orbax params directory; a `UserError` when `path` is not one."""
    from launch.cli import UserError

    path = os.path.abspath(os.fspath(path))
    try:
        return ckptr.metadata(path).item_metadata
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{path} is not an orbax params directory ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300] if str(e) else ''})") from e


def restore_params(path: str | os.PathLike, abstract, shardings=None):
    """Read an orbax params directory into the structure of `abstract` (ShapeDtypeStructs; None:
    the stored tree). Without `shardings` everything lands on one device, whatever devices saved
    it (a pod's run read on a laptop). Stored names and shapes that differ from `abstract`'s
    are a `UserError` listing them (before anything is read)."""
    path = os.path.abspath(os.fspath(path))
    AbandonedReads.install()
    with ocp.StandardCheckpointer() as ckptr:
        stored = stored_tree(path, ckptr)
        if abstract is None:
            abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored)
        else:
            check_tree(stored, abstract, path)
        if shardings is None:
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: one, abstract)
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        return ckptr.restore(path, abstract)


def latest_checkpoint(workdir: str | os.PathLike) -> str | None:
    """`<workdir>/checkpoints/<latest step>` of a `launch.train` run; None when `workdir` is not
    a run (has no `checkpoints/`)."""
    checkpoints = os.path.join(os.fspath(workdir), "checkpoints")
    if not os.path.isdir(checkpoints):
        return None
    steps = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit())
    if not steps:
        raise FileNotFoundError(f"{checkpoints} holds no finished checkpoint")
    return os.path.join(checkpoints, str(steps[-1]))


def resolve_params_dir(path: str | os.PathLike) -> str:
    """A training run's workdir -> its latest checkpoint's `params` item; other paths as given.

    Training runs keep orbax checkpoints in `<workdir>/checkpoints/<step>/`, whose `params`
    item holds the weights used for inference."""
    step_dir = latest_checkpoint(path)
    if step_dir is None:
        return os.fspath(path)
    params = os.path.join(step_dir, "params")
    if not os.path.isdir(params):
        raise FileNotFoundError(f"{params} does not exist: the latest checkpoint of the run "
                                f"{os.fspath(path)} has no params item")
    return params


def restore_state_entries(step_dir: str | os.PathLike, names: Sequence[str]) -> dict:
    """Top-level entries of a run checkpoint's `state` item (e.g. ``("params",)``), read alone
    (the optimiser state stays on disk), on one device."""
    path = os.path.abspath(os.path.join(os.fspath(step_dir), "state"))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    AbandonedReads.install()
    with ocp.PyTreeCheckpointer() as ckptr:
        stored = ckptr.metadata(path).item_metadata
        missing = [n for n in names if n not in stored]
        if missing:
            raise FileNotFoundError(f"{path} holds no {missing} (it has {sorted(stored)})")
        abstract = {n: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored[n])
                    for n in names}
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=one), abstract)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=restore_args, partial_restore=True))


def run_config(step_dir: str | os.PathLike) -> dict:
    """The config (as a dict) saved with a run checkpoint."""
    AbandonedReads.install()
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        return ckptr.restore(os.path.abspath(os.path.join(os.fspath(step_dir), "config")))


def load_params(path: str | os.PathLike, *, abstract, from_torch: Callable[[str], dict],
                shardings=None):
    """Params from an orbax params directory, a training run's workdir (its latest `params`
    item) or a PyTorch file (converted with `from_torch(path)`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return restore_params(resolve_params_dir(path), abstract, shardings)
    params = from_torch(path)
    check_tree(params, abstract, path)
    # e.g. a float16 upstream file for a float32 model: stored as the model's parameters are
    params = jax.tree.map(lambda p, a: p if p.dtype == a.dtype else np.asarray(p, a.dtype),
                          params, abstract)
    if shardings is not None:
        return jax.device_put(params, shardings)
    return params
