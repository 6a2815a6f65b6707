"""What the processes of a multi-process run decide together: stop after a signal, or stop on
one process's bad input.

A process whose input fails (a `DataError`: too many undecodable images, a shard that does not
read) cannot simply leave: the others would wait for it in the next collective until the
coordination service's heartbeat timeout, then fail with an error that names no cause. So it
keeps going on stand-in batches (training: its last batch; latent extraction: padding) and
reports the failure at the next exchange. The training loop holds one every
`signal_check_every` steps and before it writes anything (metrics, sample grids, checkpoints);
latent extraction after each shard, before writing it. There every process raises the same
`InputFailed`, naming the failing process, where it failed and its message, and nothing is
written from work that saw the stand-in batches: the newest checkpoint, or shard, is one from
before the failure.

An exchange is one gather of an int32 per process; the messages are gathered only when a
process reports a failure.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.experimental import multihost_utils

from launch.data.sources import DataError

MESSAGE_BYTES = 1024  # longer messages are cut (UTF-8, bytes that no longer decode replaced)


class InputFailed(DataError):
    """Bad input on one process, raised on every process at the same exchange."""

    every_process = True  # launch.cli: no process is left waiting for this one


@dataclasses.dataclass(frozen=True)
class LocalFailure:
    """This process's input error: where it happened ("at step 3", "in shard 12") and its
    message."""

    where: str
    message: str

    def text(self) -> str:
        return f"{self.where}: {self.message}"


RESUME_TRAINING = ("no checkpoint was written after it: fix the input and rerun the same "
                   "command to resume from the last one")


def _encode(failure: LocalFailure | None) -> np.ndarray:
    """int32 (1 + MESSAGE_BYTES,): the text's length in bytes, then its bytes."""
    row = np.zeros(1 + MESSAGE_BYTES, np.int32)
    if failure is not None:
        text = failure.text().encode()[:MESSAGE_BYTES]
        row[0] = len(text)
        row[1:1 + len(text)] = np.frombuffer(text, np.uint8)
    return row


def _decode(row: np.ndarray) -> str:
    return row[1:1 + int(row[0])].astype(np.uint8).tobytes().decode(errors="replace")


def exchange(signalled: bool, failure: LocalFailure | None, *,
             remedy: str = RESUME_TRAINING) -> bool:
    """True on every process when any process was `signalled`. When any process reports a
    `failure`, every process raises `InputFailed` with the lowest-numbered such process's
    text and `remedy`. One process: no collective, and a failure is its plain `DataError`."""
    if jax.process_count() == 1:
        if failure is not None:
            raise DataError(failure.message)
        return signalled
    code = int(signalled) | (int(failure is not None) << 1)
    with jax.transfer_guard("allow"):  # an intended exchange of one flag per process
        codes = np.asarray(multihost_utils.process_allgather(np.int32(code))).reshape(-1)
        if not np.any(codes & 2):
            return bool(np.any(codes & 1))
        rows = np.asarray(multihost_utils.process_allgather(_encode(failure)))
    process = int(np.flatnonzero(codes & 2)[0])
    raise InputFailed(f"bad input on process {process} {_decode(rows[process])} (every process "
                      f"stopped; {remedy})")
