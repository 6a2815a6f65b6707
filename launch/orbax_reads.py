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

import orbax.checkpoint as ocp

ORBAX_DIR = os.path.dirname(ocp.__file__)  # where orbax's coroutines are defined


class AbandonedReads:
    """Drops, and counts, what a failed orbax restore prints after its error.

    Orbax gives up on the first array it cannot read, closes its event loop and leaves the
    other reads running. Each read that finishes later tries to wake the closed loop ("Event
    loop is closed"), orbax's unfinished read coroutines fail as they are collected (both
    raised where nothing can catch them: `sys.unraisablehook`), and asyncio logs each of
    orbax's tasks left with an error ("Task exception was never retrieved"). For the tiny
    LightningDiT that was 290 lines of tracebacks after the one warning that names the
    checkpoint, and more after the error line when no checkpoint could be read. They say
    nothing the restore's own error did not.

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
        return instance

    def __init__(self):
        self.dropped = 0
        self._previous_hook = sys.unraisablehook

    def _unraisable(self, unraisable) -> None:
        error, source = unraisable.exc_value, unraisable.object
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        orbax_read = inspect.iscoroutine(source) and ORBAX_DIR in source.cr_code.co_filename
        if closed_loop or orbax_read:
            self.dropped += 1
        else:
            self._previous_hook(unraisable)

    def _keep_record(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Task exception was never retrieved") and ORBAX_DIR in message:
            self.dropped += 1
            return False
        return True
