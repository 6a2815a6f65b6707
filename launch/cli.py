"""Entry-point wrapper: a user's mistake ends in one readable line and exit status 1.

    if __name__ == "__main__":
        cli.run(main)

`UserError`s (and the data pipeline's `DataError`s, missing files) print ``error: <message>``
without a traceback; anything else is a bug and keeps its traceback. Before `main` starts JAX,
a command that will run on the CPU restarts itself once with glibc's huge-page tunable
(`launch.host_memory`) and adds its XLA:CPU flags (`launch.xla_cpu`).
"""

from __future__ import annotations

import sys

from absl import app

from launch import host_memory, xla_cpu
from launch.data.sources import DataError


class UserError(ValueError):
    """A problem with the command line, config or files that the user can fix."""


USER_ERRORS = (UserError, DataError, FileNotFoundError, FileExistsError, PermissionError,
               NotADirectoryError, IsADirectoryError)


def run(main) -> None:
    def guarded(argv):
        try:
            return main(argv)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    host_memory.use_huge_pages()
    xla_cpu.add_cpu_flags()
    app.run(guarded)
