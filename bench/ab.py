"""Two versions of this repository on one benchmark, in alternating processes.

    python -m bench.ab --base HEAD~1 -- bench.train_step --variant B/1 --batch 8 --steps 8
    python -m bench.ab --base main --head my-branch --pairs 5 --key step_mean_s -- \\
        bench.train_step --variant B/1 --batch 8 --dtype bfloat16

Each version is a git revision checked out in a temporary worktree, or `worktree`: this
checkout as it is, uncommitted changes included (the default head). Every pair runs the
benchmark once per version, each time in a new process (``python -m MODULE ARGS`` with the
version's tree as working directory, so its own packages are imported), the order alternating
between pairs so that neither version always runs first. The benchmark's last-line JSON gives
`--key` (default `step_s`); the result is head / base per pair and their median (< 1: head
faster).

Why processes: compiling both programs in one process and alternating calls measured 0.93x
for a change that ran at the same speed in separate processes (docs/performance.md: the
two programs' temporaries differed in size). Prints the runs as they end and, as its last line,
one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from bench.argtypes import positive_int
from bench.suite import last_json_object

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKTREE = "worktree"


def _git(*args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench.ab: git {' '.join(args)} failed in {REPO}: "
                         f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def resolve(version: str) -> str:
    """A revision's full commit id, or WORKTREE; a readable exit for anything else."""
    if version == WORKTREE:
        return WORKTREE
    proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{version}^{{commit}}"],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench.ab: {version!r} is not a commit of the repository at {REPO} "
                         f"(nor {WORKTREE!r}, this checkout as it is)")
    return proc.stdout.strip()


@contextlib.contextmanager
def checked_out(commits: dict[str, str]):
    """{name: commit or WORKTREE} -> {name: a tree holding that version}; the temporary
    worktrees are removed on exit."""
    with tempfile.TemporaryDirectory(prefix="bench_ab_") as tmp:
        trees, added = {}, []
        try:
            for name, commit in commits.items():
                if commit == WORKTREE:
                    trees[name] = REPO
                    continue
                path = pathlib.Path(tmp) / name
                _git("worktree", "add", "--detach", str(path), commit)
                added.append(path)
                trees[name] = path
            yield trees
        finally:
            for path in added:
                subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO,
                               capture_output=True)


def run_once(tree: pathlib.Path, command: list[str], key: str, timeout_s: float) -> float:
    """Runs ``python -m command`` in `tree`; returns its last-line JSON's `key`."""
    argv = [sys.executable, "-m", *command]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tree), *filter(None, [os.environ.get("PYTHONPATH", "")])])}
    try:
        proc = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"bench.ab: {' '.join(command)} ran past {timeout_s:.0f} s in {tree} "
                         "(--timeout_s)") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"bench.ab: {' '.join(command)} failed in {tree} "
                         f"(exit {proc.returncode}):\n{tail}")
    result = last_json_object(proc.stdout)
    if result is None:
        raise SystemExit(f"bench.ab: the last line of {' '.join(command)} is not JSON holding "
                         f"an object: {lines[-1][:200]!r}")
    value = result.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        numeric = sorted(k for k, v in result.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise SystemExit(f"bench.ab: --key {key!r} is not a number in the JSON of "
                         f"{' '.join(command)}; numeric keys: {', '.join(numeric)}")
    return float(value)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="python -m bench.ab [options] -- MODULE [ARGS ...]")
    parser.add_argument("--base", required=True,
                        help=f"a git revision, or {WORKTREE!r} (this checkout as it is)")
    parser.add_argument("--head", default=WORKTREE, help="the same; default: this checkout")
    parser.add_argument("--pairs", type=positive_int, default=3,
                        help="runs of each version (alternating order)")
    parser.add_argument("--key", default="step_s", help="the number compared, from the JSON")
    parser.add_argument("--timeout_s", type=float, default=1800.0, help="limit per run")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="after --: a benchmark module and its arguments")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("name the benchmark after --, e.g. -- bench.train_step --variant B/1")
    commits = {"base": resolve(args.base), "head": resolve(args.head)}
    if commits["base"] == commits["head"]:
        print(f"bench.ab: base and head are the same version ({commits['base'][:12]}): an A/A "
              "run, which shows the noise", flush=True)

    values = {"base": [], "head": []}
    start = time.monotonic()
    with checked_out(commits) as trees:
        for pair in range(args.pairs):
            order = ("base", "head") if pair % 2 == 0 else ("head", "base")
            for name in order:
                value = run_once(trees[name], command, args.key, args.timeout_s)
                values[name].append(value)
                print(f"pair {pair + 1}/{args.pairs} {name:4s} {args.key} = {value:.6g}",
                      flush=True)
    if 0.0 in values["base"]:
        raise SystemExit(f"bench.ab: base's {args.key} was 0 in a run ({values['base']}): "
                         "no ratio; pick another --key")
    ratios = [h / b for h, b in zip(values["head"], values["base"])]
    result = {"bench": "ab", "command": command, "key": args.key, "pairs": args.pairs,
              "base": args.base, "head": args.head,
              "base_commit": commits["base"], "head_commit": commits["head"],
              "base_values": values["base"], "head_values": values["head"],
              "ratios": ratios, "ratio_median": statistics.median(ratios),
              "seconds": time.monotonic() - start}
    print(f"head / base {args.key}: median {result['ratio_median']:.4f} over {args.pairs} "
          f"pairs ({', '.join(f'{r:.3f}' for r in ratios)})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
