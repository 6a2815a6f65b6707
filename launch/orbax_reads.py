"""The tracebacks orbax leaves after a read it gave up on, dropped (`AbandonedReads`): a
checkpoint that cannot be read ends in the one warning or error that names it.

Every reader of orbax checkpoints here (`launch.training.checkpointing`, `launch.params_io`)
calls `AbandonedReads.install()` before it reads.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import warnings

import orbax.checkpoint as ocp

ORBAX_DIR = os.path.dirname(ocp.__file__)  # where orbax's coroutines are defined
# what asyncio logs of a task left with an error, or destroyed before it ran
ABANDONED_TASKS = ("Task exception was never retrieved", "Task was destroyed but it is pending")
# what asyncio logs of a future left with an error nobody read: tensorstore's side of a read
# orbax gave up on (tensorstore awaits through a future it creates on orbax's loop); its
# error, set from C++ with no Python frames, is an absl status ("DATA_LOSS: ...")
ABANDONED_FUTURE = "Future exception was never retrieved"
STATUS_CODES = frozenset((
    "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED"))


class AbandonedReads:
    """Drops, and counts, what a failed orbax restore prints after its error.

    Orbax gives up on the first array it cannot read, closes its event loop and leaves the
    other reads running. Each read that finishes later tries to wake the closed loop ("Event
    loop is closed"), orbax's unfinished read coroutines fail as they are collected (both
    raised where nothing can catch them: `sys.unraisablehook`), and asyncio logs each of
    orbax's tasks left with an error ("Task exception was never retrieved"), and each of
    tensorstore's futures ("Future exception was never retrieved": once in a fresh-clone CI
    run, as the last line of stderr, after the command's error line). For the tiny
    LightningDiT that was 290 lines of tracebacks after the one warning that names the
    checkpoint, and more after the error line when no checkpoint could be read. A read
    orbax had scheduled but not started when its loop closed is destroyed pending (asyncio
    logs "Task was destroyed but it is pending!") and its coroutine warns ("coroutine ... was
    never awaited"), whenever it is collected: that can be long after the restore, in
    whatever code runs then. None of it says anything the restore's own error did not.

    Hooked in before a process's first restore (`install`) and left there: the reads end
    while the run goes on, or while it exits with its error, and the first can end before
    orbax's error reaches us. Anything else goes on to the previous hook, or to the log.
    """

    _installed: AbandonedReads | None = None

    @classmethod
    def install(cls) -> AbandonedReads:
        """The process's instance, hooked in again if something replaced the hook since."""
        if cls._installed is None:
            cls._installed = cls()
        instance = cls._installed
        if sys.unraisablehook != instance._unraisable:
            instance._previous_hook = sys.unraisablehook
            sys.unraisablehook = instance._unraisable
        logging.getLogger("asyncio").addFilter(instance._keep_record)  # once: it checks
        # CPython hands each never-awaited coroutine to this function of `warnings` as it is
        # collected (a private name, looked up on every call; left alone where it is missing)
        unawaited = getattr(warnings, "_warn_unawaited_coroutine", None)
        if unawaited is not None and unawaited != instance._unawaited:
            instance._previous_unawaited = unawaited
            warnings._warn_unawaited_coroutine = instance._unawaited
        return instance

    def __init__(self):
        self.dropped = 0
        self._previous_hook = sys.unraisablehook
        self._previous_unawaited = getattr(warnings, "_warn_unawaited_coroutine", None)

    def _unraisable(self, unraisable) -> None:
        error, source = unraisable.exc_value, unraisable.object
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        orbax_read = inspect.iscoroutine(source) and ORBAX_DIR in source.cr_code.co_filename
        if closed_loop or orbax_read:
            self.dropped += 1
        else:
            self._previous_hook(unraisable)

    def _unawaited(self, coroutine) -> None:
        if ORBAX_DIR in coroutine.cr_code.co_filename:
            self.dropped += 1
        else:  # the warning then names this line, not the arbitrary one the collection ran at
            self._previous_unawaited(coroutine)

    def _keep_record(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if (message.startswith(ABANDONED_TASKS) and ORBAX_DIR in message
                or message.startswith(ABANDONED_FUTURE) and _status_error(record.exc_info)):
            self.dropped += 1
            return False
        return True


def _status_error(exc_info) -> bool:
    """Whether a log record's exception is one of tensorstore's: raised in C++ (no traceback),
    its message an absl status code and a colon."""
    error = exc_info[1] if exc_info else None
    return (error is not None and error.__traceback__ is None
            and str(error).split(":", 1)[0] in STATUS_CODES)
