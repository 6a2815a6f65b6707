"""Global-batch grain pipelines: a host-count-independent order, per-process slices, resumable.

The order of the data is a function of (seed, global batch size) only. Global batch `step`
holds the records `order.record(step, slot)` for slots 0..B-1: a seeded permutation per epoch
(`grain.experimental.index_shuffle`, O(1) per index), the epoch's remainder dropped as
upstream's `drop_last`. Process p of P reads only slots [p B/P, (p+1) B/P) of every global
batch, and the per-process slices are assembled into global `jax.Array`s on the mesh. So 1 or
64 hosts see the same batches, and a run can resume on another host count: the whole position
is the global step (`GlobalBatchIterator.get_state`).

Per-item randomness (crop offsets, flips, which latent view) is seeded by (seed, step, slot),
never by the worker or host that computes it. Bad items (undecodable, malformed) are replaced
by a deterministic fallback record for the same slot, counted, and reported by
`BadInputMonitor` in the main process; batches stay full.

Decoding runs in grain worker processes (`worker_count`); each worker builds whole batches
(batching precedes `mp_prefetch`), so the batches never depend on the worker count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import grain
import jax
import numpy as np
from absl import logging

from launch.data.sources import DataError

# batch keys that carry bookkeeping from the workers to the monitor, never to the model
BAD_KEY = "_bad_records"  # (local_batch, max_attempts) int64: records that failed, -1 padded
UPSCALED_KEY = "_upscaled"  # (local_batch,) bool: image smaller than the crop, upscaled


def _derived_seed(*values: int) -> int:
    """A 32-bit seed for index_shuffle from several integers (well mixed, deterministic)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0] >> 1)


class GlobalOrder:
    """Which record fills slot `slot` of global batch `step`, as a pure function."""

    def __init__(self, num_records: int, global_batch_size: int, seed: int,
                 shuffle: bool = True):
        if num_records < global_batch_size:
            raise DataError(f"{num_records} records cannot fill one global batch of "
                            f"{global_batch_size} (epochs drop their remainder, as upstream)")
        self.num_records = num_records
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = num_records // global_batch_size

    @functools.lru_cache(maxsize=64)  # noqa: B019 (a few (epoch, attempt) pairs per process)
    def _permutation_seed(self, epoch: int, attempt: int) -> int:
        return _derived_seed(self.seed, epoch, attempt)

    def record(self, step: int, slot: int, attempt: int = 0) -> int:
        """Record index for `slot` of batch `step`; attempt k > 0 gives the k-th fallback."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        index = step_in_epoch * self.global_batch_size + slot
        if not self.shuffle and attempt == 0:
            return index
        return grain.experimental.index_shuffle(
            index, max_index=self.num_records - 1,
            seed=self._permutation_seed(epoch, attempt), rounds=4)


def item_rng(seed: int, step: int, slot: int, attempt: int = 0) -> np.random.Generator:
    """The random stream of one item: the same on every host, worker and resume."""
    return np.random.default_rng([seed, step, slot, attempt])


class SlotMap(grain.transforms.Map):
    """Host-local element index -> (step, global slot) -> example, with bad-item fallback.

    `load(record, rng)` returns the example dict or raises on bad input; `describe(record)`
    names a record for errors.
    """

    def __init__(self, order: GlobalOrder, load: Callable, describe: Callable[[int], str],
                 process_index: int, local_batch: int, max_attempts: int):
        self.order = order
        self.load = load
        self.describe = describe
        self.process_index = process_index
        self.local_batch = local_batch
        self.max_attempts = max_attempts

    def map(self, element: int) -> dict:
        step, offset = divmod(element, self.local_batch)
        slot = self.process_index * self.local_batch + offset
        bad = np.full((self.max_attempts,), -1, np.int64)
        errors = []
        for attempt in range(self.max_attempts):
            record = self.order.record(step, slot, attempt)
            try:
                example = self.load(record, item_rng(self.order.seed, step, slot, attempt))
            except Exception as e:  # noqa: BLE001 (any failure of one item is a bad item)
                bad[attempt] = record
                errors.append(f"{self.describe(record)}: {type(e).__name__}: {e}")
                continue
            example[BAD_KEY] = bad
            return example
        raise DataError(f"{self.max_attempts} bad items in a row for slot {slot} of batch "
                        f"{step}; is config.data.path right? " + "; ".join(errors))


class BadInputMonitor:
    """Counts bad and upscaled items in the main process; logs names; stops past a fraction.

    The fraction is bad / (bad + good) over this process's items, checked once at least
    `min_items` were read (a few bad JPEGs early in an epoch must not stop a run).
    """

    def __init__(self, describe: Callable[[int], str], reason: Callable[[int], str] | None,
                 max_bad_fraction: float, min_items: int = 1000, max_named: int = 10):
        self.describe = describe
        self.reason = reason
        self.max_bad_fraction = max_bad_fraction
        self.min_items = min_items
        self.max_named = max_named
        self.num_good = 0
        self.num_bad = 0
        self.num_upscaled = 0
        self.first_bad: list[str] = []

    def update(self, batch: dict) -> None:
        bad = np.asarray(batch.pop(BAD_KEY))
        upscaled = batch.pop(UPSCALED_KEY, None)
        self.num_good += bad.shape[0]
        for record in bad[bad >= 0]:
            self.num_bad += 1
            if len(self.first_bad) < self.max_named:
                name = self.describe(int(record))
                why = self.reason(int(record)) if self.reason else ""
                self.first_bad.append(name)
                logging.warning("skipped bad item %s (%s); %d bad so far", name, why,
                                self.num_bad)
        if upscaled is not None and np.any(upscaled):
            if self.num_upscaled == 0:
                logging.warning("images smaller than the crop are upscaled (bicubic for the "
                                "center crop, bilinear for the random crop), as upstream does")
            self.num_upscaled += int(np.sum(upscaled))
        total = self.num_good + self.num_bad
        fraction = self.num_bad / max(total, 1)
        if total >= self.min_items and fraction > self.max_bad_fraction:
            raise DataError(
                f"{self.num_bad} of {total} items ({fraction:.1%}) could not be decoded, more "
                f"than config.data.max_bad_fraction={self.max_bad_fraction}; first: "
                + ", ".join(self.first_bad))

    def state(self) -> dict:
        return {"num_good": self.num_good, "num_bad": self.num_bad,
                "num_upscaled": self.num_upscaled, "first_bad": list(self.first_bad)}

    def set_state(self, state: dict) -> None:
        self.num_good = int(state["num_good"])
        self.num_bad = int(state["num_bad"])
        self.num_upscaled = int(state["num_upscaled"])
        self.first_bad = list(state["first_bad"])


def process_slice(global_batch_size: int, process_index: int | None, process_count: int | None
                  ) -> tuple[int, int, int]:
    """(process_index, process_count, local batch size), defaulting to this JAX process."""
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if global_batch_size % process_count:
        raise DataError(f"global batch {global_batch_size} is not divisible by the "
                        f"{process_count} processes")
    return process_index, process_count, global_batch_size // process_count


def read_options(read_threads: int, prefetch: int) -> grain.ReadOptions:
    """`prefetch` batches in flight, each built by one of up to `read_threads` threads."""
    prefetch = max(prefetch, 1)
    return grain.ReadOptions(num_threads=min(max(read_threads, 1), prefetch),
                             prefetch_buffer_size=prefetch)


def build_batches(slot_map: SlotMap, start_step: int, num_steps: int, worker_count: int,
                  read_threads: int, prefetch: int) -> grain.IterDataset:
    """The grain dataset of this process's slices of global batches [start_step, num_steps)."""
    b = slot_map.local_batch
    ds = grain.MapDataset.range(start_step * b, num_steps * b).map(slot_map)
    ds = ds.batch(b, drop_remainder=True)
    ds = ds.to_iter_dataset(read_options(read_threads, prefetch))
    if worker_count > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return ds


class GlobalBatchIterator:
    """Iterates global batches; `get_state`/`set_state` hold only host-independent numbers.

    `make_dataset(start_step)` builds this process's grain pipeline from a global step; with a
    mesh, each host batch becomes a global `jax.Array` sharded over ('data', 'fsdp') on the
    leading axis, otherwise batches stay host numpy (this process's slice).
    """

    def __init__(self, make_dataset: Callable[[int], grain.IterDataset],
                 monitor: BadInputMonitor, identity: dict, mesh=None, start_step: int = 0):
        self._make_dataset = make_dataset
        self.monitor = monitor
        self.identity = identity  # what a saved state must match (seed, batch, data size)
        self.mesh = mesh
        self.step = start_step
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(self._make_dataset(self.step))
        batch = next(self._iterator)
        self.monitor.update(batch)
        self.step += 1
        if self.mesh is None:
            return batch
        from launch.sharding import batch_sharding

        return {k: jax.make_array_from_process_local_data(batch_sharding(self.mesh, v.ndim), v)
                for k, v in batch.items()}

    def get_state(self) -> dict:
        """JSON-able position: the next global step, plus counters and what must match."""
        return {"step": self.step, **self.identity, "monitor": self.monitor.state()}

    def set_state(self, state: dict) -> None:
        """Continue from a saved position (from any number of hosts or workers)."""
        for key, value in self.identity.items():
            if state.get(key) != value:
                raise DataError(f"data state was saved with {key}={state.get(key)!r}, this "
                                f"pipeline has {key}={value!r}: the data order would change")
        self.close()
        self.step = int(state["step"])
        self.monitor.set_state(state["monitor"])

    def seek(self, step: int) -> None:
        """Continue with global batch `step` (a run imported at that step)."""
        self.close()
        self.step = step

    def close(self) -> None:
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None


# a run's length when the caller does not say: the pipeline is lazy, so "forever"
UNBOUNDED_STEPS = 10**12


def make_global_iterator(data, load: Callable, *, num_records: int,
                         describe: Callable[[int], str], reason: Callable[[int], str] | None,
                         global_batch_size: int, seed: int, shuffle: bool = True, mesh=None,
                         start_step: int = 0, num_steps: int | None = None,
                         process_index: int | None = None,
                         process_count: int | None = None) -> GlobalBatchIterator:
    """The resumable global-batch iterator over `num_records` records read by `load(record,
    rng)`, configured by a `config.data` block (workers, prefetch, bad-input limits)."""
    p, _, local_batch = process_slice(global_batch_size, process_index, process_count)
    order = GlobalOrder(num_records, global_batch_size, seed, shuffle=shuffle)
    slot_map = SlotMap(order, load, describe, p, local_batch, data.max_attempts)
    monitor = BadInputMonitor(describe, reason, data.max_bad_fraction,
                              min_items=data.bad_fraction_min_items)
    identity = {"seed": seed, "global_batch_size": global_batch_size,
                "num_records": num_records}
    return GlobalBatchIterator(
        lambda start: build_batches(slot_map, start, num_steps or UNBOUNDED_STEPS,
                                    data.worker_count, data.read_threads, data.prefetch),
        monitor, identity, mesh=mesh, start_step=start_step)
