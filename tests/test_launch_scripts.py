"""The TPU pod launcher (`launch/tpu/pod.py`) and the SLURM script (`launch/gpu/train.sbatch`).

Nothing here reaches a cloud or a cluster: the pod commands are checked as argv lists and in
`--dry_run`, and the sbatch script runs under bash with a stub `srun` that echoes its arguments.
"""

import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

from launch.tpu import pod

REPO = pathlib.Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "gpu" / "train.sbatch"
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tpu1", "--zone=us-west4-a"]
JAX_TPU = shlex.quote(f"jax[tpu]=={pod.jax_version()}")


def commands(*argv: str) -> list[list[str]]:
    args = pod.parse_args(list(argv))
    return pod.COMMANDS[args.command](args)


def write_executable(path: pathlib.Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_create_commands():
    assert commands("create", "--name", "tpu1", "--zone", "us-west4-a") == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "tpu1", "--zone=us-west4-a",
        "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]]
    assert commands("create", "--name", "tpu1", "--zone", "z", "--project", "p", "--spot",
                    "--accelerator", "v4-32", "--version", "tpu-ubuntu2204-base") == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "tpu1", "--zone=z", "--project=p",
        "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]]
    assert commands("create", "--name", "tpu1", "--zone", "z", "--preemptible")[0][-1] == \
        "--preemptible"
    with pytest.raises(SystemExit):  # spot and preemptible exclude each other
        pod.parse_args(["create", "--name", "t", "--zone", "z", "--spot", "--preemptible"])


def test_jax_version_is_the_requirements_pin():
    pins = [line for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.startswith("jax==")]
    assert pins == [f"jax=={pod.jax_version()}"]


def test_setup_commands_git_clone():
    got = commands("setup", "--name", "tpu1", "--zone", "us-west4-a",
                   "--repo", "https://github.com/org/repo.git", "--branch", "dev")
    remote = ("if [ -d vavae-lightningdit-jax/.git ]; then"
              " git -C vavae-lightningdit-jax fetch origin dev"
              " && git -C vavae-lightningdit-jax checkout -B dev FETCH_HEAD;"
              " else git clone --branch dev https://github.com/org/repo.git"
              " vavae-lightningdit-jax; fi"
              f" && cd vavae-lightningdit-jax && make install && .venv/bin/pip install {JAX_TPU}")
    assert got == [[*SSH, "--worker=all", "--command", remote]]


def test_setup_commands_copy_from_local_checkout():
    got = commands("setup", "--name", "tpu1", "--zone", "us-west4-a", "--copy_from", str(REPO),
                   "--remote_dir", "code dir")
    assert got == [
        ["tar", "-czf", "/tmp/tpu1-code.tar.gz", "--exclude=.venv", "--exclude=runs",
         "--exclude=.git", "--exclude=__pycache__", "--exclude=.pytest_cache",
         "--exclude=.ruff_cache", "-C", str(REPO), "."],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/tpu1-code.tar.gz",
         "tpu1:tpu1-code.tar.gz", "--zone=us-west4-a", "--worker=all"],
        [*SSH, "--worker=all", "--command",
         "mkdir -p 'code dir' && tar -xzf tpu1-code.tar.gz -C 'code dir' && rm tpu1-code.tar.gz"
         f" && cd 'code dir' && make install && .venv/bin/pip install {JAX_TPU}"],
    ]


def test_setup_needs_one_source():
    with pytest.raises(SystemExit):
        pod.parse_args(["setup", "--name", "t", "--zone", "z"])
    with pytest.raises(SystemExit):
        pod.parse_args(["setup", "--name", "t", "--zone", "z", "--repo", "u", "--copy_from", "."])
    with pytest.raises(pod.PodError, match="not a directory"):
        commands("setup", "--name", "t", "--zone", "z", "--copy_from", "/no/such/dir")


def test_run_commands_quote_every_argument():
    got = commands("run", "--name", "tpu1", "--zone", "us-west4-a",
                   "--config", "configs/lightningdit.py:xl1_64ep", "--workdir", "/mnt/b/runs/xl1",
                   "--env", "TFDS_DATA_DIR=/mnt/b/my data", "--",
                   "--config.name=two words", "--config.note=$HOME", "--config.seed=1")
    remote = ("cd vavae-lightningdit-jax || exit 1; "
              "JAX_DISTRIBUTED=1 TFDS_DATA_DIR='/mnt/b/my data' nohup .venv/bin/python -m "
              "launch.train --config=configs/lightningdit.py:xl1_64ep --workdir=/mnt/b/runs/xl1 "
              "'--config.name=two words' '--config.note=$HOME' --config.seed=1 "
              "--compilation_cache_dir=/mnt/b/runs/xl1/xla_cache "
              '> ~/train.log 2>&1 < /dev/null & echo "$(hostname): started pid $!, log in '
              '~/train.log"')
    assert got == [[*SSH, "--worker=all", "--command", remote]]
    # The remote shell sees exactly the arguments given, `$HOME` unexpanded.
    words = shlex.split(remote.split("nohup ")[1].split(" >")[0])
    assert words[-4:-1] == ["--config.name=two words", "--config.note=$HOME", "--config.seed=1"]
    # a cache directory of the user's own replaces the one on the shared workdir
    got = commands("run", "--name", "tpu1", "--zone", "z", "--config", "c", "--workdir", "/w",
                   "--", "--compilation_cache_dir=/mnt/b/cache")
    assert got[0][-1].count("--compilation_cache_dir") == 1 and "/mnt/b/cache" in got[0][-1]


def test_run_rejects_bad_env_and_extra_args_elsewhere():
    with pytest.raises(pod.PodError, match="KEY=VALUE"):
        commands("run", "--name", "t", "--zone", "z", "--config", "c", "--workdir", "w",
                 "--env", "NOEQUALS")
    with pytest.raises(pod.PodError, match="gs://b/xl1: training writes through the file system"):
        commands("run", "--name", "t", "--zone", "z", "--config", "c", "--workdir", "gs://b/xl1")
    with pytest.raises(SystemExit):
        pod.parse_args(["tail", "--name", "t", "--zone", "z", "--", "--config.x=1"])


def test_tail_and_delete_commands():
    assert commands("tail", "--name", "tpu1", "--zone", "us-west4-a") == [
        [*SSH, "--worker=0", "--command", "tail -f ~/train.log"]]
    assert commands("tail", "--name", "tpu1", "--zone", "us-west4-a", "--worker", "3")[0][-3] == \
        "--worker=3"
    delete = ["gcloud", "compute", "tpus", "tpu-vm", "delete", "tpu1", "--zone=us-west4-a"]
    assert commands("delete", "--name", "tpu1", "--zone", "us-west4-a") == [delete]
    assert commands("delete", "--name", "tpu1", "--zone", "us-west4-a", "--yes") == [
        delete + ["--quiet"]]


def run_pod(*argv: str, path: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path}
    return subprocess.run([sys.executable, "-m", "launch.tpu.pod", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=30)


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path):
    # A gcloud (and tar) on PATH that leave a mark if anything calls them.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "tar"):
        write_executable(bin_dir / tool, f"#!/bin/sh\ntouch {tmp_path}/called\n")
    argv = ["setup", "--name", "tpu1", "--zone", "us-west4-a", "--copy_from", str(REPO)]
    result = run_pod(*argv, "--dry_run", path=str(bin_dir))
    assert result.returncode == 0, result.stderr
    expected = [shlex.join(command) for command in commands(*argv)]
    assert result.stdout.splitlines() == expected
    assert not (tmp_path / "called").exists()


def test_missing_gcloud_is_one_error_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_pod("delete", "--name", "tpu1", "--zone", "z", "--yes",
                     path=str(empty))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "gcloud" in lines[0]


def test_sbatch_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(SBATCH)], check=True)


def run_sbatch(tmp_path: pathlib.Path, *args: str, env: dict[str, str] | None = None,
               ) -> subprocess.CompletedProcess:
    """Run the script under bash with a stub `srun` that prints its environment and argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    write_executable(bin_dir / "srun", '#!/bin/bash\necho "JAX_DISTRIBUTED=$JAX_DISTRIBUTED"\n'
                     'echo "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"\n'
                     'echo "PWD=$PWD"\nfor a in "$@"; do echo "ARG=$a"; done\n')
    clean = {k: v for k, v in os.environ.items()
             if k not in ("CONFIG", "WORKDIR", "REPO_DIR", "JAX_DISTRIBUTED",
                          "JAX_LOCAL_DEVICE_IDS")
             and not k.startswith("SLURM_")}
    full_env = {**clean, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                "SLURM_SUBMIT_DIR": str(REPO), "SLURM_CPUS_ON_NODE": "96", **(env or {})}
    return subprocess.run(["bash", str(SBATCH), *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=30)


def srun_call(result: subprocess.CompletedProcess) -> tuple[dict[str, str], list[str]]:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    env = dict(line.split("=", 1) for line in lines if line.startswith(("JAX_", "PWD=")))
    return env, [line[len("ARG="):] for line in lines if line.startswith("ARG=")]


def test_sbatch_runs_srun_with_config_workdir_and_extra_args(tmp_path):
    result = run_sbatch(tmp_path, "configs/lightningdit.py:xl1_64ep", "/shared/runs/xl 1",
                        "--config.name=two words", "--config.note=$HOME")
    env, argv = srun_call(result)
    assert env == {"JAX_DISTRIBUTED": "1", "JAX_LOCAL_DEVICE_IDS": "0,1,2,3,4,5,6,7",
                   "PWD": str(REPO)}
    assert argv == ["--ntasks-per-node=1", "--cpus-per-task=96", ".venv/bin/python", "-m",
                    "launch.train", "--config=configs/lightningdit.py:xl1_64ep",
                    "--workdir=/shared/runs/xl 1", "--config.name=two words",
                    "--config.note=$HOME", "--compilation_cache_dir=/shared/runs/xl 1/xla_cache"]
    _, argv = srun_call(run_sbatch(tmp_path, "c", "w", "--compilation_cache_dir=/mine"))
    assert argv[-1] == "--compilation_cache_dir=/mine"


def test_sbatch_takes_config_and_workdir_from_the_environment(tmp_path):
    config, workdir = "configs/vavae.py:f16d32_vfdinov2", "/shared/runs/vae"
    result = run_sbatch(tmp_path, "--config.seed=3", env={"CONFIG": config, "WORKDIR": workdir})
    _, argv = srun_call(result)
    assert argv[-4:-1] == [f"--config={config}", f"--workdir={workdir}", "--config.seed=3"]
    # Outside SLURM (no SLURM_SUBMIT_DIR) it finds the repo from its own path.
    result = run_sbatch(tmp_path, "c", "w", env={"SLURM_SUBMIT_DIR": ""})
    env, _ = srun_call(result)
    assert env["PWD"] == str(REPO)


def test_sbatch_without_config_prints_usage(tmp_path):
    result = run_sbatch(tmp_path, "--config.seed=3")
    assert result.returncode != 0
    assert "usage: sbatch" in result.stderr
    assert "ARG=" not in result.stdout


def test_sbatch_gives_the_one_process_per_node_every_gpu(tmp_path):
    """JAX's SLURM auto-detection alone would restrict each process to GPU SLURM_LOCALID (0)."""
    from jax._src import clusters

    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_NTASKS": "2",
             "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in slurm.items():
            mp.setenv(k, v)
        detected = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            None, None, None, None, None, None)
    assert detected[3] == [0]  # why the script must set JAX_LOCAL_DEVICE_IDS
    env, _ = srun_call(run_sbatch(tmp_path, "c", "w", env={"SLURM_GPUS_ON_NODE": "4"}))
    assert env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
    env, _ = srun_call(run_sbatch(tmp_path, "c", "w", env={"JAX_LOCAL_DEVICE_IDS": "0,2"}))
    assert env["JAX_LOCAL_DEVICE_IDS"] == "0,2"
