"""Entry-point wrapper: a user's mistake ends in one readable line and exit status 1.

    if __name__ == "__main__":
        cli.run(main)

`UserError`s (and the data pipeline's `DataError`s, missing files) print ``error: <message>``
without a traceback; anything else is a bug and keeps its traceback. Before `main` starts JAX,
a command that will run on the CPU restarts itself once with glibc's huge-page tunable
(`launch.host_memory`) and adds its XLA:CPU flags (`launch.xla_cpu`); then it points XLA's
persistent compilation cache at ``--compilation_cache_dir`` (`launch.compile_cache`). The INFO
lines of orbax, grain and JAX are left out of the log unless ``--library_logs``
(`LibraryInfoFilter`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import traceback

from absl import app, flags
from absl import logging as absl_logging
from ml_collections.config_flags.config_flags import is_config_flag

from launch import compile_cache, host_memory, xla_cpu
from launch.data.sources import DataError, is_url

QUIET_LIBRARIES = ("orbax", "grain", "jax")

flags.DEFINE_bool("library_logs", False, "also log the INFO lines of orbax, grain and JAX (every "
                  "step of each checkpoint save and restore, ...); their warnings show either way")
flags.DEFINE_string("compilation_cache_dir", None, "XLA's persistent compilation cache: the "
                    "programs this command compiles are kept here and loaded by the next run "
                    "with the same shapes (a resumed run); default "
                    f"{compile_cache.default_directory()}, '' for none (launch.compile_cache)")


class LibraryInfoFilter(logging.Filter):
    """Drops records at INFO and below logged from the source files of `packages` (orbax writes
    about 40 INFO lines per checkpoint save or restore: about 660 of the demo's 738 log lines).
    Their warnings and errors, and every line of this project, pass. The packages' folders
    are looked up, not imported, and matched as path prefixes (a checkout under a folder
    named like a package is not matched)."""

    def __init__(self, packages: tuple[str, ...] = QUIET_LIBRARIES):
        super().__init__()
        self.folders = tuple(os.path.join(folder, "") for package in packages
                             if (spec := importlib.util.find_spec(package)) is not None
                             for folder in spec.submodule_search_locations or ())

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not record.pathname.startswith(self.folders)


class UserError(ValueError):
    """A problem with the command line, config or files that the user can fix."""


USER_ERRORS = (UserError, DataError, compile_cache.CacheDirError, FileNotFoundError,
               FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)


def user_errors() -> tuple[type[BaseException], ...]:
    """`USER_ERRORS`, the weight converters' errors (a file that is not a checkpoint, a state
    dict of another model) and the training loop's NaN guard (it names the step, the metric
    and the remedies; the run resumes from its last checkpoint). Their modules are looked up,
    not imported: an error of theirs can only come from an imported module, and this one
    stays light to import."""
    found = [getattr(sys.modules.get(module), name, None) for module, name in (
        ("torchport.rules", "ConversionError"), ("torchport.state_dict", "CheckpointFileError"),
        ("launch.training.loop", "NonFiniteError"))]
    return USER_ERRORS + tuple(error for error in found if error is not None)


def path_flag(name: str) -> None:
    """Refuse a URL (`is_url`) as flag `name`; a bucket is used through a mount (gcsfuse) or a
    shared file system."""
    flags.register_validator(
        name, lambda value: value is None or not is_url(value),
        message="is a URL; the commands read and write files through the file system: give a "
                "path (a local disk, or shared storage mounted at the same path on every host)")


path_flag("compilation_cache_dir")


def run(main) -> None:
    def guarded(argv):
        if not flags.FLAGS.library_logs:
            absl_logging.get_absl_handler().addFilter(LibraryInfoFilter())
        try:
            compile_cache.configure(flags.FLAGS.compilation_cache_dir)
            result = main(argv)
            if compile_cache.used():  # a command that compiled nothing worth keeping is quiet
                absl_logging.info("%s", compile_cache.summary())
            return result
        except Exception as e:
            if _joined_a_process_group():
                _leave_process_group(e)
            if not isinstance(e, user_errors()):
                raise
            _exit(str(e))

    host_memory.use_huge_pages()
    xla_cpu.add_cpu_flags()
    app.run(guarded, flags_parser=parse_flags)


def _joined_a_process_group() -> bool:
    jax = sys.modules.get("jax")  # not imported: no process group
    return jax is not None and jax.distributed.is_initialized()


def _leave_process_group(error: Exception) -> None:
    """Print `error` (one line, or the traceback of a bug) and exit at once. A normal exit waits
    at jax.distributed's shutdown barrier (5 minutes) for the other processes, which are waiting
    in a collective for this one; gone, it is noticed by the coordination service, which stops
    them within its heartbeat timeout (100 s). An error raised on every process at once
    (`every_process`: bad input the processes agreed on) needs no such note."""
    if isinstance(error, user_errors()):
        print(f"error: {error}", file=sys.stderr)
    else:
        traceback.print_exc()
    if not getattr(error, "every_process", False):
        print(f"error: process {sys.modules['jax'].process_index()} stopped; the others stop "
              "when the coordination service notices (up to 100 s)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _exit(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with the mistakes of a command line as one line each: a bad flag
    value (a config file's own error: its last line, not the traceback ml_collections puts in
    the message), an override of a field the config does not have, a config file that does
    not load; then every config flag is loaded, so that a missing file is reported here and
    not at its first use."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        _exit(_flag_error_text(str(e)))
    except (AttributeError, KeyError) as e:
        # ml_collections applies `--config.a.b=...` while parsing and raises these for a
        # field that does not exist; anything else is a bug and keeps its traceback
        overrides = [a for a in argv[1:] if any(a.startswith(f"--{n}.") for n in _config_flags())]
        if not overrides:
            raise
        _exit(f"unknown config field in {' '.join(overrides)}: {_key_error_text(e)}")
    for name in _config_flags():
        try:
            config = flags.FLAGS[name].value
            getattr(config, "keys", None)  # a config that failed to load raises here
        except OSError as e:
            _exit(f"--{name}: {_config_load_text(e)}")
    return rest


def _config_flags() -> list[str]:
    return [name for name in flags.FLAGS if is_config_flag(flags.FLAGS[name])]


def _flag_error_text(text: str) -> str:
    """'flag --config=x.py:v: Error whilst parsing config file: <traceback> ValueError: m' ->
    'flag --config=x.py:v: m' (the config's own message)."""
    required = re.match(r"flag --(\w+)=None: Flag --\w+ must have a value other than None", text)
    if required:
        return f"--{required.group(1)} is required"
    if "Error whilst parsing config file" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        head = lines[0].split(": Error whilst parsing", 1)[0]
        last = lines[-1].split(": ", 1)[-1] if ": " in lines[-1] else lines[-1]
        return f"{head}: {last}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _key_error_text(error: BaseException) -> str:
    """ml_collections' nested KeyError / AttributeError repr -> its plain message."""
    text = str(error.args[0]) if error.args else str(error)
    text = text.replace("\\'", "'").replace("\\n", "\n")
    lines = [line.strip().strip("'\"") for line in text.splitlines()]
    return "; ".join(line for line in lines if line)


def _config_load_text(error: OSError) -> str:
    """ml_collections' 'Failed loading config file ... [Errno 2] ...' -> the file and why."""
    text = str(error.__cause__ or error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    attempts = [line for line in lines if line.startswith("[Errno") or "Error" in line]
    paths = [line for line in lines[1:] if not line.startswith(("[Errno", "Attempted"))]
    if attempts:
        return f"cannot load the config file {paths[0] if paths else ''}: {attempts[-1]}"
    return " ".join(lines)
