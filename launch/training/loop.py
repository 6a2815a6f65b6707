"""The training loop, one for both models (`launch.training.adapters` says what differs).

Sections, in order: mesh and model; state (born sharded, or restored from the newest readable
checkpoint, or initialised from released weights); data (positioned at the restored step);
the jitted step; the loop with metrics, grids, checkpoints and the preemption check.

With `config.transfer_guard` = 'log' or 'disallow', every iteration after the first (the one
that compiles) runs under `jax.transfer_guard`: the loop's intended copies are explicit (the
batch by `jax.make_array_from_process_local_data`, metrics by `jax.device_get` every
`log_every` steps, sample grids by `jax.device_put` / `jax.device_get`) or exempt (checkpoint
saves, the grid tokenizer's one-time load, the multi-host exchange of stop signals and input
failures), so any other host<->device or device<->device copy in the steady state is logged or
raises. (XLA:CPU never guards device-to-host reads: numpy shares the buffer, jax-ml/jax#16602.)

Rerunning the same command in the same workdir continues where the last checkpoint left off,
bit-identically on the same mesh: the state, the data position and every random key (derived
from (config.seed, step)) are restored.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn

from launch import agreement, compile_cache, sharding, xla_cpu
from launch.cli import UserError
from launch.data.sources import DataError
from launch.training.adapters import make_adapter
from launch.training.checkpointing import Checkpointer, abstract_with_shardings
from launch.training.metrics import MetricLogger

TRANSFER_GUARD_LEVELS = ("allow", "log", "disallow")
NAN_POLICIES = ("stop", "skip")  # a non-finite loss: stop with a checkpoint, or skip the update


class NonFiniteError(FloatingPointError):
    """A NaN or Inf in the training metrics."""


class StopSignal:
    """Remembers a SIGTERM / SIGINT (preemption, Ctrl-C) until the loop can save and stop."""

    def __init__(self):
        self.received = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        logging.warning("received %s: saving a checkpoint at the next step, then stopping",
                        signal.Signals(signum).name)
        self.received = signum

    def agreed(self, failure: agreement.LocalFailure | None = None) -> bool:
        """True on every process when any process got a signal (one collective on several
        processes); raises `agreement.InputFailed` on every process when any process reports
        an input `failure`."""
        return agreement.exchange(self.received is not None, failure)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_finite(history: list[tuple[int, dict]], policy: str = "stop") -> None:
    """'stop': raise at the first step whose metrics hold a NaN or Inf, naming the metric.
    'skip': those steps' updates were dropped by `skip_nonfinite`; log them."""
    for step, metrics in history:
        for name, value in metrics.items():
            if np.isfinite(value):
                continue
            if policy == "skip":
                logging.warning("step %d: %s = %s, update skipped", step, name, value)
                break
            raise NonFiniteError(f"{name} = {value} at step {step}: stopping (lower the "
                                 "learning rate, enable QK-norm or gradient clipping, set "
                                 "config.nan_policy='skip', or resume from an earlier "
                                 "checkpoint)")


def skip_nonfinite(step_fn):
    """Wrap a step: when its loss or gradient norm is not finite, keep the old state (only the
    step counter advances) and report `skipped` = 1."""

    def guarded(state, batch, rng, frozen):
        new_state, metrics = step_fn(state, batch, rng, frozen)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics.get("grad_norm", 0.0))
        kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        return kept.replace(step=new_state.step), {**metrics, "skipped": 1.0 - ok}

    return guarded


def config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def train(config, workdir: str) -> dict:
    """Train `config` in `workdir` up to `config.total_steps`; returns the last logged metrics."""
    # -- mesh and model ----------------------------------------------------------------------
    guard_level = config.get("transfer_guard") or "allow"
    if guard_level not in TRANSFER_GUARD_LEVELS:
        raise UserError(f"config.transfer_guard={guard_level!r}: expected one of "
                        f"{TRANSFER_GUARD_LEVELS}")
    if config.get("nan_policy", "stop") not in NAN_POLICIES:
        raise UserError(f"config.nan_policy={config.nan_policy!r}: expected one of "
                        f"{NAN_POLICIES}")
    if config.train.global_batch_size < 1 or config.total_steps < 0:
        raise UserError(f"config.train.global_batch_size={config.train.global_batch_size}, "
                        f"config.total_steps={config.total_steps}: expected a batch of at "
                        f"least 1 and steps >= 0")
    adapter = make_adapter(config)
    devices = jax.devices()[: config.get("num_devices") or None]  # 0: every device
    mesh = sharding.create_mesh(dict(config.mesh), devices)
    batch_size = config.train.global_batch_size
    if batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise UserError(f"train.global_batch_size={batch_size} is not divisible by the "
                         f"data x fsdp devices of mesh {dict(mesh.shape)}")
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))

    # -- data: opened first, so a wrong path fails before any weights are allocated -------------
    try:
        data, failure = adapter.make_iterator(global_batch_size=batch_size, mesh=mesh), None
    except DataError as e:
        if jax.process_count() == 1:
            raise
        data, failure = None, agreement.LocalFailure("before the first step", str(e))
    try:
        agreement.exchange(False, failure)  # several processes: all stop if one cannot read
    except agreement.InputFailed:
        if data is not None:
            data.close()
        raise

    # -- state: restored, or born sharded ------------------------------------------------------
    try:
        abstract_boxed = jax.eval_shape(adapter.init_state, init_rng)
        state_shardings = sharding.logical_shardings(abstract_boxed, mesh)
        checkpointer = Checkpointer(workdir, max_to_keep=config.max_to_keep,
                                    keep_period=config.get("keep_period") or None)
        restored = checkpointer.restore_latest(
            abstract_with_shardings(nn.meta.unbox(abstract_boxed), state_shardings))
        if restored is not None:
            start_step, state, data_state = restored
            logging.info("resumed from %s at step %d", checkpointer.directory, start_step)
        else:
            start_step, data_state = 0, None
            state, _ = sharding.sharded_init(adapter.init_state, init_rng, mesh=mesh)
            if config.get("init_from"):
                state = adapter.init_from(config.init_from, state, state_shardings)
                start_step = int(state.step)  # > 0 when continuing an upstream PyTorch run
        write_config(workdir, config)
        frozen = adapter.frozen(mesh)
        if data_state is not None:
            data.set_state(data_state)  # the saved position (and its counters)
        else:
            data.seek(start_step)
    except BaseException:
        # a checkpoint of another config, a missing weight file, ...: stop the input workers
        # before the error leaves (orbax's manager, left mid-restore, is left to exit)
        data.close()
        raise

    # -- the step: compiled once, state donated ------------------------------------------------
    replicated = sharding.replicated(mesh)
    # replicated over the mesh once (not copied to it every step); the same key on every
    # process, so this works across hosts where a device_put to the mesh would not
    step_rng = jax.random.wrap_key_data(jax.make_array_from_process_local_data(
        replicated, np.asarray(jax.random.key_data(step_rng))))
    logger = MetricLogger(workdir, total_steps=config.total_steps, batch_size=batch_size,
                          flops_per_example=adapter.flops_per_example(
                              adapter.inference_params(nn.meta.unbox(abstract_boxed))),
                          num_devices=mesh.devices.size, enabled=jax.process_index() == 0,
                          start_step=start_step)
    step_fn = None
    stop = StopSignal()
    history: list[tuple[int, dict]] = []
    last = {}
    step = start_step
    guard = contextlib.ExitStack()  # jax.transfer_guard(guard_level) from the second iteration
    try:
        while step < config.total_steps:
            if step == start_step + 1 and guard_level != "allow":
                guard.enter_context(jax.transfer_guard(guard_level))
            if failure is None:
                try:
                    batch = next(data)
                except DataError as e:
                    if jax.process_count() == 1:
                        raise
                    # several processes: step on the last batch until the next exchange, so
                    # that the others are not left waiting in the step's collectives
                    failure = agreement.LocalFailure(f"at step {step + 1}", str(e))
                    logging.error("bad input at step %d: %s", step + 1, e)
            if step_fn is None:
                agreement.exchange(False, failure)  # no last batch to step on yet
                batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
                one_step = adapter.step
                if config.get("nan_policy", "stop") == "skip":
                    one_step = skip_nonfinite(one_step)
                frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
                step_fn = jax.jit(one_step,
                                  in_shardings=(state_shardings, batch_shardings,
                                                replicated, frozen_shardings),
                                  out_shardings=(state_shardings, replicated),
                                  donate_argnums=0,
                                  compiler_options=xla_cpu.step_compiler_options(
                                      config.model.get("remat", False)))
            started = time.perf_counter()
            with sharding.mesh_context(mesh):  # the models' logical axis constraints
                state, metrics = step_fn(state, batch, step_rng, frozen)
            step += 1
            history.append((step, metrics))
            if step == start_step + 1:
                logger.start(step)  # throughput excludes compilation
                logging.info("training step compiled or loaded, and started, in %.1f s; %s",
                             time.perf_counter() - started, compile_cache.summary())

            # -- agreement: signals and bad input (several processes decide together every
            # `signal_check_every` steps and before anything is written; one: every step) ----
            log_now = step % config.log_every == 0 or step == config.total_steps
            grid_now = bool(config.get("sample_every")) and step % config.sample_every == 0
            save_now = step % config.ckpt_every == 0 or step == config.total_steps
            check = (jax.process_count() == 1 or log_now or grid_now or save_now
                     or step % config.get("signal_check_every", 10) == 0)
            signalled = check and stop.agreed(failure)

            # -- metrics, grids ------------------------------------------------------------
            if log_now:
                fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()})
                           for s, m in history]
                check_finite(fetched, config.get("nan_policy", "stop"))
                mean = {k: float(np.mean([m[k] for _, m in fetched]))
                        for k in fetched[-1][1]}
                last = logger.write(step, mean)
                history = []
            if grid_now:
                step_on_mesh = jax.make_array_from_process_local_data(
                    replicated, np.asarray(step, np.uint32))
                grid = adapter.visualise(state, batch, jax.random.fold_in(step_rng, step_on_mesh))
                logger.write_grid(step, "samples", grid)

            # -- checkpoints, preemption ---------------------------------------------------
            preempted = signalled or checkpointer.reached_preemption(step)
            if preempted and not check:
                stop.agreed(failure)  # orbax's preemption point: agree on the input first
            if save_now or preempted:
                checkpointer.save(step, state=state,
                                  params=adapter.inference_params(state),
                                  data_state=data.get_state(), config=config_dict(config),
                                  force=preempted)
            if preempted:
                logging.warning("stopped at step %d after a signal; rerun the same "
                                "command to continue", step)
                break
    finally:
        guard.close()
        stop.restore()
        checkpointer.close()  # waits for the last asynchronous save
        data.close()
        logger.close()
    if step_fn is not None:
        last["compilations"] = step_fn._cache_size()  # noqa: SLF001 (recompilation check)
    last["final_step"] = step
    return last


def ensure_workdir(workdir: str) -> None:
    """Create the workdir (process 0); `train` writes its config.json once the run's
    checkpoint, if any, has been read with the config (so a mistaken --workdir keeps its own)."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)


def write_config(workdir: str, config) -> None:
    """The run's config as JSON in `workdir/config.json` (process 0; written whole or not at
    all, as everything a run may be killed while writing)."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "config.json")
        with open(path + ".tmp", "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        os.replace(path + ".tmp", path)
