"""`python tests/killed_train.py POINT ARGS...`: `python -m launch.train ARGS...`, killed with
SIGKILL (no handler, no cleanup: a lost machine, or the end of a preemption's grace period)
at a chosen point, for tests/test_train.py's resume tests. POINT:

  log:N      after checkpoint N-2 is committed, write half of step N's metrics line, then die
  commit:N   send SIGTERM after logging step N-1 (the loop saves step N and stops), then die
             while orbax commits that save, its files written but not yet renamed
"""

import os
import runpy
import signal
import sys
import time

from launch.training import metrics


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def wait_for(path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.isdir(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)


def main() -> None:
    point, step = sys.argv.pop(1).split(":")
    at = int(step)
    write = metrics.MetricLogger.write
    if point == "log":
        def write_then_die(self, step, values):
            if step != at:
                return write(self, step, values)
            wait_for(os.path.join(self.workdir, "checkpoints", str(at - 2)))
            self._jsonl.write(f'{{"step": {step}, "loss": 2.9')  # noqa: SLF001
            self._jsonl.flush()  # noqa: SLF001
            return die()
        metrics.MetricLogger.write = write_then_die
    elif point == "commit":
        from orbax.checkpoint._src.path import async_path

        def write_then_signal(self, step, values):
            record = write(self, step, values)
            if step == at - 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return record
        rename = async_path.rename

        async def rename_or_die(source, target):
            if os.path.basename(os.fspath(target)) == str(at):
                die()
            return await rename(source, target)
        metrics.MetricLogger.write = write_then_signal
        async_path.rename = rename_or_die
    else:
        raise SystemExit(f"unknown kill point {point!r}")
    sys.argv[0] = "launch.train"
    runpy.run_module("launch.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
