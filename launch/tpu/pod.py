"""Create, set up, train on, watch and delete a Cloud TPU pod slice, through gcloud.

Every host of a slice runs the same command (`gcloud ... ssh --worker=all`); with
`JAX_DISTRIBUTED=1`, `launch/distributed.py` joins them into one JAX process group. Needs only
the standard library, so it runs from the repo root with any Python 3.11:

    python -m launch.tpu.pod create --name my-tpu --zone us-west4-a --accelerator v5litepod-16
    python -m launch.tpu.pod setup --name my-tpu --zone us-west4-a --repo https://github.com/ORG/REPO
    python -m launch.tpu.pod setup --name my-tpu --zone us-west4-a --copy_from .
    python -m launch.tpu.pod run --name my-tpu --zone us-west4-a \\
        --config configs/lightningdit.py:xl1_64ep --workdir /mnt/shared/runs/xl1 \\
        -- --config.data.path /mnt/shared/latents/imagenet_train_256
    python -m launch.tpu.pod tail --name my-tpu --zone us-west4-a --worker 0
    python -m launch.tpu.pod delete --name my-tpu --zone us-west4-a

`--dry_run` prints the commands instead of running them. Arguments after `--` go to
`launch.train` unchanged (`run` only), so `--dry_run` must come before `--`; `run` adds
`--compilation_cache_dir=<workdir>/xla_cache` unless they give one (`launch.compile_cache`). Each
`*_commands(args)` function returns the argv lists that its subcommand runs, in order.
"""

from __future__ import annotations

import argparse
import pathlib
import posixpath
import re
import shlex
import shutil
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
# Left unquoted in remote commands on purpose: the worker's shell expands `~` to its home.
LOG_FILE = "~/train.log"
# Not uploaded by `setup --copy_from`: environments, outputs and caches belong to one machine.
COPY_EXCLUDES = (".venv", "runs", ".git", "__pycache__", ".pytest_cache", ".ruff_cache")
# `run`'s XLA compilation cache, under --workdir unless the arguments after `--` name one
SHARED_CACHE = "xla_cache"


class PodError(Exception):
    """A problem the user can fix; printed as one `error:` line."""


def jax_version(requirements: pathlib.Path = REPO_ROOT / "requirements.txt") -> str:
    """The `jax==X` pin of requirements.txt, so that `jax[tpu]` matches the installed jax."""
    for line in requirements.read_text().splitlines():
        match = re.match(r"jax==([\w.]+)", line.strip())
        if match:
            return match.group(1)
    raise PodError(f"no 'jax==<version>' line in {requirements}")


def _location(args: argparse.Namespace) -> list[str]:
    return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def _ssh(args: argparse.Namespace, command: str, worker: str = "all") -> list[str]:
    """Run the shell command `command` on one worker of the slice, or on all of them."""
    return [*TPU_VM, "ssh", args.name, *_location(args), f"--worker={worker}",
            "--command", command]


def create_commands(args: argparse.Namespace) -> list[list[str]]:
    argv = [*TPU_VM, "create", args.name, *_location(args),
            f"--accelerator-type={args.accelerator}", f"--version={args.version}"]
    if args.spot:
        argv.append("--spot")
    if args.preemptible:
        argv.append("--preemptible")
    return [argv]


def setup_commands(args: argparse.Namespace) -> list[list[str]]:
    """Put the code on every worker (git clone, or a tarball of a local checkout), then install."""
    checkout = shlex.quote(args.remote_dir)
    commands = []
    if args.copy_from:
        if not pathlib.Path(args.copy_from).is_dir():
            raise PodError(f"--copy_from {args.copy_from!r} is not a directory")
        # `tpu-vm scp --recurse` cannot leave out .venv or runs/, so one tarball travels instead.
        archive = f"{args.name}-code.tar.gz"
        local_archive = f"/tmp/{archive}"
        excludes = [f"--exclude={pattern}" for pattern in COPY_EXCLUDES]
        commands.append(["tar", "-czf", local_archive, *excludes, "-C", args.copy_from, "."])
        commands.append([*TPU_VM, "scp", local_archive, f"{args.name}:{archive}",
                         *_location(args), "--worker=all"])
        archive = shlex.quote(archive)
        get_code = f"mkdir -p {checkout} && tar -xzf {archive} -C {checkout} && rm {archive}"
    else:
        repo, branch = shlex.quote(args.repo), shlex.quote(args.branch)
        # A second `setup` updates the checkout in place and keeps its .venv.
        get_code = (f"if [ -d {checkout}/.git ]; then git -C {checkout} fetch origin {branch}"
                    f" && git -C {checkout} checkout -B {branch} FETCH_HEAD;"
                    f" else git clone --branch {branch} {repo} {checkout}; fi")
    tpu_jax = shlex.quote(f"jax[tpu]=={jax_version()}")
    install = f"cd {checkout} && make install && .venv/bin/pip install {tpu_jax}"
    commands.append(_ssh(args, f"{get_code} && {install}"))
    return commands


def run_commands(args: argparse.Namespace) -> list[list[str]]:
    """Start `launch.train` in the background on every worker, logging to ~/train.log."""
    env = ["JAX_DISTRIBUTED=1"]
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise PodError(f"--env expects KEY=VALUE, got {item!r}")
        env.append(f"{key}={shlex.quote(value)}")  # a quoted `'K=V'` would not be an assignment
    if "://" in args.workdir:
        raise PodError(f"--workdir {args.workdir}: training writes through the file system; give "
                       "a path that every worker reaches (a shared file system or a bucket "
                       "mounted at the same path on each, e.g. /mnt/shared/runs/xl1)")
    train = [".venv/bin/python", "-m", "launch.train", f"--config={args.config}",
             f"--workdir={args.workdir}", *args.extra]
    if not any(a.startswith("--compilation_cache_dir") for a in args.extra):
        # on the shared workdir, so that every worker of a resumed run loads its programs (a
        # worker's own ~/.cache would only ever hold what worker 0 wrote there)
        train.append(f"--compilation_cache_dir={posixpath.join(args.workdir, SHARED_CACHE)}")
    # nohup, redirected output and stdin from /dev/null let ssh return while training goes on.
    command = (f"cd {shlex.quote(args.remote_dir)} || exit 1; "
               f"{' '.join(env)} nohup {shlex.join(train)} > {LOG_FILE} 2>&1 < /dev/null & "
               f'echo "$(hostname): started pid $!, log in {LOG_FILE}"')
    return [_ssh(args, command)]


def tail_commands(args: argparse.Namespace) -> list[list[str]]:
    return [_ssh(args, f"tail -f {LOG_FILE}", worker=args.worker)]


def delete_commands(args: argparse.Namespace) -> list[list[str]]:
    # Without --yes, gcloud itself asks for confirmation.
    argv = [*TPU_VM, "delete", args.name, *_location(args)]
    return [argv + ["--quiet"]] if args.yes else [argv]


COMMANDS = {"create": create_commands, "setup": setup_commands, "run": run_commands,
            "tail": tail_commands, "delete": delete_commands}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM (slice) name")
    common.add_argument("--zone", required=True, help="e.g. us-west4-a")
    common.add_argument("--project", help="GCP project (default: gcloud's configured one)")
    common.add_argument("--dry_run", action="store_true",
                        help="print the commands instead of running them")
    checkout = argparse.ArgumentParser(add_help=False)
    checkout.add_argument("--remote_dir", default="vavae-lightningdit-jax",
                          help="checkout on each worker, relative to its home directory")

    parser = argparse.ArgumentParser(prog="python -m launch.tpu.pod",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    create = sub.add_parser("create", parents=[common], help="create the slice")
    create.add_argument("--accelerator", default="v5litepod-16", help="accelerator type")
    create.add_argument("--version", default="v2-alpha-tpuv5-lite", help="TPU VM software image")
    capacity = create.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="spot capacity (cheaper)")
    capacity.add_argument("--preemptible", action="store_true", help="preemptible capacity")

    setup = sub.add_parser("setup", parents=[common, checkout],
                           help="copy or clone the code to every worker and install it")
    source = setup.add_mutually_exclusive_group(required=True)
    source.add_argument("--repo", help="git URL to clone on every worker")
    source.add_argument("--copy_from", help="local checkout to upload (without .venv, runs/)")
    setup.add_argument("--branch", default="main", help="branch of --repo")

    run = sub.add_parser("run", parents=[common, checkout],
                         help="start training on every worker (arguments after -- go to it)")
    run.add_argument("--config", required=True, help="e.g. configs/lightningdit.py:xl1_64ep")
    run.add_argument("--workdir", required=True,
                     help="a path every worker reaches, e.g. /mnt/shared/runs/xl1")
    run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                     help="extra environment variable for training (repeatable)")

    tail = sub.add_parser("tail", parents=[common], help="follow the training log of a worker")
    tail.add_argument("--worker", default="0", help="worker index")

    delete = sub.add_parser("delete", parents=[common], help="delete the slice")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse a command line; what follows the first `--` becomes `args.extra`."""
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if extra and args.command != "run":
        parser.error(f"arguments after '--' are only for 'run', got {shlex.join(extra)}")
    args.extra = extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        commands = COMMANDS[args.command](args)
    except PodError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        for command in commands:
            print(shlex.join(command))
        return 0
    if shutil.which("gcloud") is None:
        print("error: gcloud not found on PATH; install the Google Cloud SDK "
              "(https://cloud.google.com/sdk) or add --dry_run", file=sys.stderr)
        return 1
    for command in commands:
        print(f"+ {shlex.join(command)}", flush=True)
        try:
            subprocess.run(command, check=True)
        except subprocess.CalledProcessError as e:
            print(f"error: exit status {e.returncode} from: {shlex.join(command)}",
                  file=sys.stderr)
            return e.returncode or 1
        except OSError as e:  # e.g. no `tar` for --copy_from
            print(f"error: cannot run {command[0]}: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # Ctrl-C ends `tail -f`; no traceback for that
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
