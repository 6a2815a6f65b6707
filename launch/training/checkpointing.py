"""Training checkpoints: an orbax `CheckpointManager` over a composite of named items.

`WORKDIR/checkpoints/<step>/` holds
  state   the whole train state (params, EMA, optimiser, step), restored onto any mesh
  params  the weights used for inference (LightningDiT: the EMA; VA-VAE: the autoencoder),
          read by extraction, sampling and conversion (`launch.params_io.resolve_params_dir`)
  data    the data iterator's position (host-independent JSON, `GlobalBatchIterator.get_state`)
  config  the run's config as JSON
Randomness needs no item: every step derives its keys from (config.seed, step).

Saves are asynchronous: `save` returns once the arrays are copied off the devices. A
checkpoint is visible only after orbax commits it (renames `<step>.orbax-checkpoint-tmp` to
`<step>`), so a kill during a save leaves the previous one; the next run deletes the unfinished
directory, which a step the run never saves again (a preemption's) would otherwise leave behind
at the size of a whole state. A latest checkpoint that cannot be read is skipped with a warning
naming it (and no more: `AbandonedReads`).
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from absl import logging

from launch.orbax_reads import AbandonedReads

ITEMS = ("state", "params", "data", "config")


def abstract_with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying the target shardings: restore straight onto the mesh."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


class Checkpointer:
    """Save / restore one run's checkpoints under `workdir/checkpoints`."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, keep_period: int | None = None,
                 async_save: bool = True, read_only: bool = False):
        """`read_only` for another run's checkpoints (`init_from`): that run may be saving,
        so nothing there is created or deleted."""
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        if read_only:  # (orbax warns about each writing option it then ignores)
            options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                   save_interval_steps=0)
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, keep_period=keep_period or None, create=True,
                cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def save(self, step: int, *, state, params, data_state: dict, config: dict,
             force: bool = False) -> bool:
        """Start saving `step` (returns at once when async); True when a save was started.

        A save is an intended copy off the devices, but orbax makes it with
        `copy_to_host_async` + `np.asarray` (and small collectives on several hosts), which JAX
        counts as implicit: it is exempt from the loop's `config.transfer_guard`."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), params=ocp.args.StandardSave(params),
            data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config))
        with jax.transfer_guard("allow"):
            return self.manager.save(step, args=args, force=force)

    def reached_preemption(self, step: int) -> bool:
        """True on every process once JAX's preemption notice (TPU maintenance) has arrived."""
        return self.manager.reached_preemption(step)

    def restore_latest(self, abstract_state) -> tuple[int, object, dict] | None:
        """(step, state, data_state) of the newest readable checkpoint, or None if there is none.

        `abstract_state` holds ShapeDtypeStructs with shardings (see `abstract_with_shardings`):
        the state lands on the current mesh, whatever mesh saved it. Checkpoints that exist but
        none of which can be read are an error, never a silent fresh start."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if steps:
            AbandonedReads.install()
        for step in steps:
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 (any unreadable checkpoint: use an older one)
                logging.warning("checkpoint %s cannot be restored (%s: %s); trying the one "
                                "before it", os.path.join(self.directory, str(step)),
                                type(e).__name__, str(e)[:500])
                continue
            return step, restored["state"], restored["data"]
        if steps:
            from launch.cli import UserError

            raise UserError(f"none of the checkpoints {steps} in {self.directory} can be "
                            "restored into this config's state (another model or optimiser "
                            "config?); use a new --workdir or the config that wrote them")
        return None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
