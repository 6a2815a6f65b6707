"""The training loop (`launch.training.loop.train`) on 8 simulated devices: one compilation,
exact resume, SIGTERM then resume, SIGKILL anywhere then resume, corrupt-checkpoint fallback,
restore on a smaller mesh, the NaN guard; and `python -m launch.train` for both tiny configs."""

import asyncio
import json
import os
import shutil
import signal
import sys
import types
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import run_module

from configs.lightningdit import get_config as dit_config
from launch.data.latents import save_latent_stats, write_latent_shard
from launch.data.pipeline import GlobalBatchIterator
from launch.training.loop import NonFiniteError, train


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """64 random 8x8x4 latents in two shards (the tiny LightningDiT's input)."""
    path = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    for shard in range(2):
        z = rng.normal(size=(32, 4, 8, 8)).astype(np.float32)
        write_latent_shard(str(path / f"latents_rank00_shard{shard:03d}.safetensors"), z,
                           z[..., ::-1], rng.integers(0, 10, 32))
    save_latent_stats(str(path / "latents_stats.pt"), np.zeros(4), np.ones(4))
    return path


def config(latents, **overrides):
    c = dit_config("tiny")
    c.update(total_steps=6, log_every=1, ckpt_every=3, sample_every=0)
    c.data.update(path=str(latents), prepare="")
    c.mesh.update(data=2, fsdp=4)
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def final_params(workdir, step):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "params"))


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def uninterrupted(latents, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("straight"))
    summary = train(config(latents), workdir)
    return workdir, summary


def test_one_compilation_and_metrics(uninterrupted):
    workdir, summary = uninterrupted
    assert summary["compilations"] == 1 and summary["final_step"] == 6
    record = json.loads(open(os.path.join(workdir, "metrics.jsonl")).readlines()[-1])
    assert {"step", "loss", "mse", "cos", "grad_norm"} <= set(record)
    assert np.isfinite(record["loss"])
    assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                  if d.isdigit()) == [3, 6]


def test_restart_is_bit_identical(latents, uninterrupted, tmp_path):
    straight, _ = uninterrupted
    train(config(latents, total_steps=3), str(tmp_path))
    summary = train(config(latents), str(tmp_path))  # the same command again: continues
    assert summary["final_step"] == 6
    assert losses(tmp_path) == losses(straight)
    assert_same_params(final_params(tmp_path, 6), final_params(straight, 6))


def test_sigterm_saves_then_resume_is_identical(latents, uninterrupted, tmp_path, monkeypatch):
    straight, _ = uninterrupted
    original = GlobalBatchIterator.__next__

    def next_batch(self):
        if self.step == 4:  # preempted while the 5th batch is read
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(GlobalBatchIterator, "__next__", next_batch)
    summary = train(config(latents), str(tmp_path))
    assert summary["final_step"] == 5
    assert os.path.isdir(tmp_path / "checkpoints" / "5")
    monkeypatch.undo()
    train(config(latents), str(tmp_path))
    assert losses(tmp_path) == losses(straight)
    assert_same_params(final_params(tmp_path, 6), final_params(straight, 6))


def tensorboard_scalars(logdir, tag: str) -> list[tuple[int, float]]:
    """(step, value) of `tag` as TensorBoard shows them: it reads a run's event files in name
    order, and a session-start event at step s hides the events read before it from s on."""
    import struct

    from tensorboardX.proto.event_pb2 import Event, SessionLog

    shown = []
    for name in sorted(os.listdir(logdir)):
        data = (logdir / name).read_bytes()
        offset = 0
        while offset < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 16 + length
            if event.session_log.status == SessionLog.START:
                shown = [(s, v) for s, v in shown if s < event.step]
            shown += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
    return shown


def test_a_resume_keeps_the_whole_metrics_records_up_to_its_step(tmp_path, caplog):
    from launch.training.metrics import drop_records_after

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3}\n{"step": 2, "lo\n{"step": 2, "loss": 2}\n\n'
                    '{"step": 3, "loss": 1}\n{"step": 4, "loss": 0.')
    drop_records_after(str(path), 3)
    assert path.read_text() == ('{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n'
                                '{"step": 3, "loss": 1}\n')
    assert f"{path}:2 is not a whole metrics record" in caplog.text
    assert f"{path}:6 is not a whole metrics record" in caplog.text
    drop_records_after(str(path), 1)
    assert path.read_text() == '{"step": 1, "loss": 3}\n'


def test_runs_killed_anywhere_resume_to_the_uninterrupted_run(latents, uninterrupted, tmp_path):
    """SIGKILL (no handler runs: a lost machine, or a preemption's grace period running out),
    once halfway through a metrics line and once while orbax commits the save a SIGTERM
    asked for. The next run finishes as if never stopped: same parameters, every step once in
    metrics.jsonl and in TensorBoard, and no unfinished checkpoint left behind."""
    import subprocess
    import sys

    from helpers import REPO, xla_flags

    straight, _ = uninterrupted
    run = tmp_path / "run"
    args = ["--config", "configs/lightningdit.py:tiny", "--workdir", str(run),
            f"--config.data.path={latents}", "--config.data.prepare=", "--config.total_steps=6",
            "--config.log_every=1", "--config.ckpt_every=3", "--config.sample_every=0",
            "--config.mesh.data=2", "--config.mesh.fsdp=4"]  # the `uninterrupted` run's config
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), PYTHONPATH=str(REPO))

    def launch(*command):
        return subprocess.run([sys.executable, *command, *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)

    killed = launch("tests/killed_train.py", "log:5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert os.listdir(run / "checkpoints") == ["3"]
    assert (run / "metrics.jsonl").read_text().endswith('{"step": 5, "loss": 2.9')

    killed = launch("tests/killed_train.py", "commit:5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "metrics.jsonl:5 is not a whole metrics record" in killed.stderr
    assert sorted(os.listdir(run / "checkpoints")) == ["3", "5.orbax-checkpoint-tmp"]

    finished = launch("-m", "launch.train")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert json.loads(finished.stdout.strip().splitlines()[-1])["final_step"] == 6
    assert sorted(os.listdir(run / "checkpoints")) == ["3", "6"]
    assert_same_params(final_params(run, 6), final_params(straight, 6))
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert losses(run) == losses(straight)
    shown = tensorboard_scalars(run / "tensorboard", "loss")
    assert [step for step, _ in shown] == [1, 2, 3, 4, 5, 6]
    assert dict(shown) == pytest.approx(losses(straight), rel=1e-7)  # float32 in the files
    assert len(os.listdir(run / "tensorboard")) == 3


def test_a_run_deletes_its_unfinished_save_and_a_reader_keeps_it(tmp_path):
    """A save a killed process left unfinished is deleted when its run starts again; a
    read-only Checkpointer (`init_from` reads another run, which may be saving) leaves it."""
    from launch.training.checkpointing import Checkpointer

    state = {"w": np.arange(4, dtype=np.float32)}
    writer = Checkpointer(str(tmp_path), async_save=False)
    writer.save(1, state=state, params=state, data_state={"i": 1}, config={})
    writer.close()
    unfinished = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "checkpoints" / "1", unfinished)
    (unfinished / "commit_success.txt").unlink(missing_ok=True)

    reader = Checkpointer(str(tmp_path), read_only=True)
    step, restored, data_state = reader.restore_latest(jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state))
    reader.close()
    assert (step, data_state) == (1, {"i": 1})
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert unfinished.is_dir()
    rerun = Checkpointer(str(tmp_path), async_save=False)  # deletes it before its first save
    rerun.save(3, state=state, params=state, data_state={"i": 3}, config={})
    rerun.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "3"]


def garble_state(workdir, step, item="state"):
    """Overwrite every array file of checkpoint `step`'s `item` (orbax lists it, cannot read it)."""
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(step), item)):
        for name in files:
            if "manifest" in name or name.startswith("d") or "ocdbt" in root:
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")


# orbax's abandoned reads of the garbled state raise one unraisable error per array, which
# `AbandonedReads` drops: any that reaches pytest fails the test
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_checkpoint_falls_back(latents, uninterrupted, tmp_path, caplog):
    straight, _ = uninterrupted
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    garble_state(tmp_path, 6)
    summary = train(config(latents), str(tmp_path))
    assert "checkpoints/6 cannot be restored" in caplog.text
    assert summary["final_step"] == 6
    assert losses(tmp_path) == losses(straight)
    assert_same_params(final_params(tmp_path, 6), final_params(straight, 6))


def test_unreadable_checkpoints_end_in_their_warnings_and_one_error_line(latents,
                                                                          uninterrupted,
                                                                          tmp_path):
    """`python -m launch.train` on a run whose checkpoints are all garbled: one warning per
    checkpoint, then one error line; `python -m launch.sample` on its garbled params: one
    error line. None of the tracebacks orbax's abandoned reads print."""
    straight, _ = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    for step in (6, 3):
        garble_state(run, step)
    garble_state(run, 6, "params")

    def failed_run(*args):
        _, stderr = run_module(*args, with_stderr=True, returncode=1)
        for noise in ("Traceback", "Event loop is closed", "Task exception was never",
                      "Task was destroyed", "was never awaited"):
            assert noise not in stderr, stderr[-3000:]
        return stderr.strip().splitlines()

    config_args = ("--config", "configs/lightningdit.py:tiny", f"--config.data.path={latents}")
    lines = failed_run("launch.train", *config_args, "--workdir", str(run),
                       "--config.data.prepare=")
    assert sum("cannot be restored" in line for line in lines) == 2
    assert lines[-1].startswith("error: none of the checkpoints [6, 3]")
    lines = failed_run("launch.sample", *config_args, "--checkpoint", str(run), "--workdir",
                       str(tmp_path / "samples"), "--num_samples", "4")
    assert lines[-1].startswith(f"error: {run / 'checkpoints' / '6' / 'params'} ")


def test_abandoned_reads_drop_only_orbax_noise(monkeypatch):
    import logging

    from launch import orbax_reads
    from launch.orbax_reads import AbandonedReads

    passed_on, asyncio_log = [], logging.getLogger("asyncio")
    monkeypatch.setattr(sys, "unraisablehook", passed_on.append)
    monkeypatch.setattr(AbandonedReads, "_installed", None)
    monkeypatch.setattr(asyncio_log, "filters", [])  # an earlier test's instance filters too
    monkeypatch.setattr(warnings, "_warn_unawaited_coroutine", warnings._warn_unawaited_coroutine)
    quiet = AbandonedReads.install()
    assert AbandonedReads.install() is quiet and sys.unraisablehook == quiet._unraisable

    def unraisable(error, source=None):
        return types.SimpleNamespace(exc_value=error, exc_type=type(error), exc_traceback=None,
                                     err_msg=None, object=source)

    def coroutine_from(filename):
        namespace = {}
        exec(compile("async def read(): pass", filename, "exec"), namespace)
        return namespace["read"]()

    orbax_read = coroutine_from(os.path.join(orbax_reads.ORBAX_DIR, "serialization.py"))
    own_read = coroutine_from("train.py")
    try:
        sys.unraisablehook(unraisable(RuntimeError("Event loop is closed")))
        sys.unraisablehook(unraisable(Exception("error while reading array"), orbax_read))
        others = [unraisable(RuntimeError("something else")),
                  unraisable(Exception("error while reading array"), own_read)]
        for other in others:
            sys.unraisablehook(other)
    finally:
        orbax_read.close()
        own_read.close()
    assert quiet.dropped == 2 and passed_on == others

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    asyncio_log.addHandler(handler)
    try:
        for defined_at in (orbax_reads.ORBAX_DIR, "train.py"):
            asyncio_log.error("Task exception was never retrieved\nfuture: <Task finished "
                              f"coro=<read() done, defined at {defined_at}:1>")
    finally:
        asyncio_log.removeHandler(handler)
    assert quiet.dropped == 3
    assert [r.getMessage().endswith("train.py:1>") for r in records] == [True]

    # a read scheduled on a loop that closed before it started: its task is destroyed
    # pending, its coroutine never awaited (both as the task is collected, here at `del`)
    records.clear()
    asyncio_log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for defined_at in (os.path.join(orbax_reads.ORBAX_DIR, "serialization.py"),
                               "train.py"):
                loop = asyncio.new_event_loop()
                task = loop.create_task(coroutine_from(defined_at))
                loop.close()
                del task
    finally:
        asyncio_log.removeHandler(handler)
    assert quiet.dropped == 5
    assert [str(w.message) for w in caught] == ["coroutine 'read' was never awaited"]
    assert [r.getMessage().startswith("Task was destroyed") for r in records] == [True]
    assert records[0].getMessage().endswith("train.py:1>>")

    # tensorstore's future of a read orbax gave up on, its error never read (collected at
    # `del`): dropped; a future with any other error is still logged
    records.clear()
    asyncio_log.addHandler(handler)
    try:
        for error in (ValueError('DATA_LOSS: Error opening "zarr" driver: Error reading ...'),
                      ValueError("DATA_LOSS in my own words"), RuntimeError("INTERNAL: mine")):
            if isinstance(error, RuntimeError):
                try:  # raised in Python: it has a traceback, so not tensorstore's
                    raise error
                except RuntimeError:
                    pass
            loop = asyncio.new_event_loop()
            future = loop.create_future()
            future.set_exception(error)
            loop.close()
            del future
    finally:
        asyncio_log.removeHandler(handler)
    assert quiet.dropped == 6
    assert [r.exc_info[1].args[0] for r in records] == ["DATA_LOSS in my own words",
                                                        "INTERNAL: mine"]


def test_restore_on_a_smaller_mesh(latents, uninterrupted, tmp_path):
    straight, _ = uninterrupted
    train(config(latents, total_steps=3), str(tmp_path))
    # 8 devices (data 2 x fsdp 4) -> 4 devices (data 4): same losses within float tolerance
    summary = train(config(latents, num_devices=4, **{"mesh.data": 4, "mesh.fsdp": 1}),
                    str(tmp_path))
    assert summary["final_step"] == 6
    a, b = losses(tmp_path), losses(straight)
    np.testing.assert_allclose([a[s] for s in range(1, 7)], [b[s] for s in range(1, 7)],
                               rtol=1e-5)


def test_nan_guard_names_the_step_and_metric(latents, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(latents, bad)
    z = np.full((32, 4, 8, 8), np.nan, np.float32)
    write_latent_shard(str(bad / "latents_rank00_shard000.safetensors"), z, z,
                       np.zeros(32, np.int64))
    write_latent_shard(str(bad / "latents_rank00_shard001.safetensors"), z, z,
                       np.zeros(32, np.int64))
    with pytest.raises(NonFiniteError, match=r"= nan at step 1"):
        train(config(bad), str(tmp_path / "run"))
    from launch import cli

    assert NonFiniteError in cli.user_errors()  # `launch.train` prints it as one error line


def test_train_cli_vavae_tiny(tmp_path):
    from launch.data.procedural import write_shapes_dataset

    tree = write_shapes_dataset(tmp_path / "shapes", image_size=32, images_per_class=4)
    out = run_module("launch.train", "--config", "configs/vavae.py:tiny", "--workdir",
                     str(tmp_path / "run"), f"--config.data.path={tree}",
                     "--config.data.procedural_images_per_class=0", "--config.total_steps=3",
                     "--config.log_every=1", "--config.ckpt_every=3", "--config.sample_every=3",
                     "--config.loss.ddp_replicas=2")  # upstream's per-GPU weights, 2 x 4 images
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["final_step"] == 3 and summary["compilations"] == 1
    assert np.isfinite(summary["loss"]) and "vf_loss" in summary
    assert (tmp_path / "run" / "images" / "samples_00000003.png").exists()
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "3" / "params")

    # the next stage starts from this run's latest state (with lr 0 it keeps those weights),
    # and leaves the save this run may be making alone
    unfinished = tmp_path / "run" / "checkpoints" / "6.orbax-checkpoint-tmp"
    unfinished.mkdir()
    _, err = run_module("launch.train", "--config", "configs/vavae.py:tiny", "--workdir",
                        str(tmp_path / "stage2"), f"--config.data.path={tree}",
                        "--config.data.procedural_images_per_class=0",
                        f"--config.init_from={tmp_path / 'run'}", "--config.optimizer.lr=0",
                        "--config.total_steps=1", "--config.ckpt_every=1",
                        "--config.sample_every=0", with_stderr=True)
    assert f"from {tmp_path / 'run' / 'checkpoints' / '3'}" in err
    assert unfinished.is_dir()
    assert_same_params(final_params(tmp_path / "stage2", 1), final_params(tmp_path / "run", 3))


def test_train_cli_lightningdit_tiny_prepares_its_latents(tmp_path):
    out = run_module("launch.train", "--config", "configs/lightningdit.py:tiny", "--workdir",
                     str(tmp_path / "run"), f"--config.data.path={tmp_path / 'latents'}",
                     f"--config.data.prepare_images={tmp_path / 'shapes'}",
                     "--config.total_steps=2", "--config.log_every=1",
                     "--config.ckpt_every=2", "--config.sample_every=2")
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["final_step"] == 2 and np.isfinite(summary["loss"])
    assert (tmp_path / "latents" / "latents_stats.pt").exists()  # extracted on first use
    assert (tmp_path / "shapes" / ".complete").exists()  # from shapes written there
    extraction = json.loads((tmp_path / "latents" / "extraction.json").read_text())
    assert extraction["num_images"] == 3000  # configs/vavae.py:tiny's 10 x 300 shapes
    assert (tmp_path / "run" / "images" / "samples_00000002.png").exists()


def test_continue_an_upstream_pytorch_run(latents, uninterrupted, tmp_path):
    """Step 3 exported to upstream's {'model', 'ema', 'opt'} .pt, then continued here."""
    import torch
    from flax import linen as nn

    from launch.build import dit_architecture
    from launch.training.adapters import LightningDiTAdapter
    from launch.training.torch_import import train_state_to_torch

    straight, _ = uninterrupted
    cfg = config(latents)
    adapter = LightningDiTAdapter(cfg)
    abstract = nn.meta.unbox(jax.eval_shape(adapter.init_state, jax.random.key(0)))
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(os.path.join(straight, "checkpoints", "3", "state"), abstract)
    torch.save(train_state_to_torch(state, model_kwargs=dit_architecture(cfg)),
               tmp_path / "upstream_step3.pt")
    summary = train(config(latents, init_from=str(tmp_path / "upstream_step3.pt")),
                    str(tmp_path / "run"))
    assert summary["final_step"] == 6
    got, want = losses(tmp_path / "run"), losses(straight)
    assert sorted(got) == [4, 5, 6]
    np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [want[s] for s in (4, 5, 6)],
                               rtol=1e-6)


def test_init_from_a_run_and_from_released_weights(uninterrupted, latents, tmp_path):
    """init_from a run's workdir (its latest EMA params) or an upstream weights file: params
    and EMA both start from them (in separate buffers: the step donates both), fresh
    optimiser, step 0."""
    from dit_jax.convert import params_to_torch
    from launch.build import dit_model
    from torchport import save_state_dict

    straight, _ = uninterrupted
    start = final_params(straight, 6)
    save_state_dict(str(tmp_path / "released.pt"),
                    params_to_torch(start, dit_model(config(latents))))
    for name, source in (("from_run", straight), ("from_file", str(tmp_path / "released.pt"))):
        summary = train(config(latents, init_from=source, total_steps=1, ckpt_every=1),
                        str(tmp_path / name))
        assert summary["final_step"] == 1 and np.isfinite(summary["loss"])
    # one AdamW step at the warm-up's first rate moves the weights only slightly
    for name in ("from_run", "from_file"):
        moved = [np.max(np.abs(np.asarray(a) - np.asarray(b))) for a, b in
                 zip(jax.tree.leaves(final_params(tmp_path / name, 1)), jax.tree.leaves(start),
                     strict=True)]
        assert max(moved) < 1e-2


def test_nan_policy_skip_keeps_the_state(latents, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(latents, bad)
    z = np.full((32, 4, 8, 8), np.nan, np.float32)
    for shard in range(2):
        write_latent_shard(str(bad / f"latents_rank00_shard{shard:03d}.safetensors"), z, z,
                           np.zeros(32, np.int64))
    summary = train(config(bad, nan_policy="skip", total_steps=2, ckpt_every=2),
                    str(tmp_path / "run"))
    assert summary["final_step"] == 2 and summary["skipped"] == 1.0
    params = final_params(tmp_path / "run", 2)  # the EMA never moved: still finite
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


def test_two_processes_train_like_one_process_with_two_devices(latents, tmp_path):
    """launch.train over two real JAX processes (one CPU device each, gloo collectives); the
    sample grid (decoded by the tiny VA-VAE on each process's own device) is written once."""
    from helpers import run_processes

    args = ["-m", "launch.train", "--config", "configs/lightningdit.py:tiny",
            f"--config.data.path={latents}", "--config.data.prepare=", "--config.total_steps=3",
            "--config.log_every=1", "--config.ckpt_every=3"]
    run_processes([*args, "--config.sample_every=3", "--workdir", str(tmp_path / "two")],
                  devices_per_process=1, as_flags=True)
    # one process, two devices
    run_module(*args[1:], "--config.sample_every=0", "--workdir", str(tmp_path / "one"))
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert sorted(two) == [1, 2, 3]
    np.testing.assert_allclose([two[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)],
                               rtol=1e-5)
    assert os.path.isdir(tmp_path / "two" / "checkpoints" / "3" / "state")
    assert os.listdir(tmp_path / "two" / "images") == ["samples_00000003.png"]


# launch.train with process 1's input failing: at its third batch (a DataError mid-run), or
# when it opens the data
_FAILING_PROCESS_1 = """
import runpy, sys
from launch.data import pipeline
from launch.data.sources import DataError
from launch.training import adapters
if "--process_id=1" in sys.argv and "{where}" == "mid_run":
    def next_batch(self, original=pipeline.GlobalBatchIterator.__next__):
        if self.step >= 2:
            raise DataError("too many undecodable items (injected)")
        return original(self)
    pipeline.GlobalBatchIterator.__next__ = next_batch
if "--process_id=1" in sys.argv and "{where}" == "open":
    def make_iterator(self, **kwargs):
        raise DataError("no shards under /mnt/missing (injected)")
    adapters.LightningDiTAdapter.make_iterator = make_iterator
sys.argv = ["launch.train", *sys.argv[1:]]
runpy.run_module("launch.train", run_name="__main__")
"""


@pytest.mark.parametrize("where, message", [
    ("mid_run", "bad input on process 1 at step 3: too many undecodable items (injected)"),
    ("open", "bad input on process 1 before the first step: no shards under /mnt/missing "
             "(injected)"),
])
def test_bad_input_on_one_process_stops_every_process_with_its_message(latents, tmp_path, where,
                                                                       message):
    """The failing process steps on its last batch until the next exchange (here the
    checkpoint at step 4, which is not written); there every process raises the same error,
    naming the failing process and step, and exits at once (before, the others stopped with
    the coordination service's "another task" error up to 100 s later)."""
    from helpers import run_processes

    results = run_processes(
        ["-c", _FAILING_PROCESS_1.format(where=where), "--config", "configs/lightningdit.py:tiny",
         f"--config.data.path={latents}", "--config.data.prepare=", "--config.total_steps=6",
         "--config.ckpt_every=2", "--config.log_every=100", "--config.sample_every=0",
         "--workdir", str(tmp_path)],
        devices_per_process=1, timeout=240, as_flags=True, check=False)
    assert [returncode for returncode, _, _ in results] == [1, 1]
    for _, _, err in results:
        assert "Traceback" not in err, err[-3000:]
        assert err.strip().splitlines()[-1].startswith(f"error: {message} (every process "
                                                       f"stopped; no checkpoint was written")
    checkpoints = tmp_path / "checkpoints"
    saved = sorted(os.listdir(checkpoints)) if checkpoints.is_dir() else []
    assert saved == (["2"] if where == "mid_run" else [])


def test_agreement_messages_and_the_single_process_path():
    from launch import agreement
    from launch.data.sources import DataError

    for text in ("too many undecodable items", "é" * 600):  # the second is cut mid-character
        row = agreement._encode(agreement.LocalFailure("at step 3", text))
        decoded = agreement._decode(row)
        full = f"at step 3: {text}"
        assert decoded == full or (len(full.encode()) > agreement.MESSAGE_BYTES
                                   and full.startswith(decoded.rstrip("\ufffd")))
    assert agreement._decode(agreement._encode(None)) == ""
    # one process: no collective; a failure is its own DataError, unchanged
    assert agreement.exchange(True, None) and not agreement.exchange(False, None)
    with pytest.raises(DataError, match="^bad shard$") as info:
        agreement.exchange(False, agreement.LocalFailure("in shard 2", "bad shard"))
    assert not isinstance(info.value, agreement.InputFailed)


def test_gradient_accumulation_through_the_loop(latents, uninterrupted, tmp_path):
    straight, _ = uninterrupted
    summary = train(config(latents, total_steps=3, **{"train.grad_accum_steps": 2}),
                    str(tmp_path))
    assert summary["compilations"] == 1
    got, want = losses(tmp_path), losses(straight)
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [want[s] for s in (1, 2, 3)],
                               rtol=1e-5)


def test_remat_through_the_loop(latents, uninterrupted, tmp_path, monkeypatch):
    """config.model.remat: the loop compiles its step with `xla_cpu.step_compiler_options`
    (remat's barriers kept on the CPU) and trains as without remat."""
    from launch import xla_cpu

    asked = []
    options = xla_cpu.step_compiler_options
    monkeypatch.setattr(xla_cpu, "step_compiler_options",
                        lambda remat: asked.append(remat) or options(remat))
    train(config(latents, total_steps=3, **{"model.remat": True}), str(tmp_path))
    assert asked == [True]
    got, want = losses(tmp_path), losses(uninterrupted[0])
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [want[s] for s in (1, 2, 3)],
                               rtol=1e-5)


@pytest.mark.parametrize("replicas", [1, 2])
def test_vavae_step_traces_in_bfloat16(replicas):
    """bf16 compute: the stage-wise vjps get cotangents of their outputs' dtype (with one
    replica, and with per-replica weights)."""
    from flax import linen as nn

    from configs.vavae import get_config as vavae_config
    from launch.training.adapters import VAVAEAdapter

    c = vavae_config("tiny")
    c.model.dtype = "bfloat16"
    c.loss.ddp_replicas = replicas
    adapter = VAVAEAdapter(c)
    state = nn.meta.unbox(jax.eval_shape(adapter.init_state, jax.random.key(0)))
    vit, x = adapter.models.foundation, jax.ShapeDtypeStruct((1, 28, 28, 3), np.float32)
    frozen = {"lpips": None,
              "foundation": nn.meta.unbox(jax.eval_shape(vit.init, jax.random.key(0), x)
                                          ["params"])}
    batch = {"image": jax.ShapeDtypeStruct((2, 32, 32, 3), np.uint8)}
    _, metrics = jax.eval_shape(adapter.step, state, batch, jax.random.key(1), frozen)
    assert metrics["loss"].shape == ()


def test_frozen_tree_can_be_fsdp_sharded():
    from configs.vavae import get_config as vavae_config
    from launch.sharding import create_mesh
    from launch.training.adapters import VAVAEAdapter

    c = vavae_config("tiny")
    c.shard_frozen = True
    frozen = VAVAEAdapter(c).frozen(create_mesh({"data": 2, "fsdp": 4}))
    specs = [x.sharding.spec for x in jax.tree.leaves(frozen["foundation"])]
    assert any("fsdp" in str(spec) for spec in specs)  # widths split, as trained weights
    c.shard_frozen = False
    frozen = VAVAEAdapter(c).frozen(create_mesh({"data": 2, "fsdp": 4}))
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(frozen["foundation"]))


def test_meshes_give_the_one_device_trajectory(latents, uninterrupted, tmp_path):
    """1 device, (data 2, fsdp 4) and (data 2, fsdp 2, tensor 2): the same losses."""
    straight, _ = uninterrupted
    train(config(latents, total_steps=3, num_devices=1, **{"mesh.data": 1, "mesh.fsdp": 1}),
          str(tmp_path / "one"))
    train(config(latents, total_steps=3, **{"mesh.fsdp": 2, "mesh.tensor": 2}),
          str(tmp_path / "tensor"))
    one = losses(tmp_path / "one")
    for other in (losses(straight), losses(tmp_path / "tensor")):
        np.testing.assert_allclose([other[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)],
                                   rtol=1e-5)
    record = json.loads(open(tmp_path / "one" / "metrics.jsonl").readlines()[-1])
    assert record["lr"] == pytest.approx(2e-4)  # upstream's constant rate, logged


def test_train_cli_user_mistake_is_one_line(tmp_path):
    import subprocess
    import sys

    from helpers import REPO

    def last_line(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "launch.train", "--workdir",
                               str(tmp_path / "run"), *args], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        return proc.stderr.strip().splitlines()[-1]

    tiny = ("--config", "configs/lightningdit.py:tiny")
    assert last_line(*tiny, f"--config.data.path={tmp_path / 'nowhere'}",
                     "--config.data.prepare=").startswith("error: latent directory")
    # the command line itself: each mistake one line, before any work
    assert last_line() == "error: --config is required"
    assert last_line("--config", "configs/lightningdit.py:nope") == (
        "error: flag --config=configs/lightningdit.py:nope: unknown config variant 'nope': "
        "tiny, demo, xl1_64ep, xl1_800ep, b1, l1")
    assert last_line("--config", "configs/nope.py:tiny") == (
        "error: --config: cannot load the config file configs/nope.py: [Errno 2] No such file "
        "or directory: 'configs/nope.py'")
    assert last_line(*tiny, "--config.model.hiden_size=3") == (
        "error: unknown config field in --config.model.hiden_size=3: hiden_size; Did you mean "
        '"hidden_size" instead of "hiden_size"?')
    assert last_line(*tiny, "--config.total_steps=abc") == (
        "error: flag --config.total_steps=abc: invalid literal for int() with base 10: 'abc'")
    # a bucket URL would be written as a local folder 'gs:' (the commands use the file system)
    assert last_line(*tiny, "--workdir", "gs://b/run").startswith(
        "error: flag --workdir=gs://b/run: is a URL; the commands read and write files through "
        "the file system")
    assert not os.path.exists(os.path.join(REPO, "gs:"))


def test_checkpoints_of_another_config_are_an_error_not_a_fresh_start(latents, uninterrupted,
                                                                     tmp_path, monkeypatch):
    from launch.cli import UserError

    straight, _ = uninterrupted
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    written = (tmp_path / "config.json").read_text()  # train() wrote it after its restore
    assert json.loads(written)["model"]["hidden_size"] != 32
    closed, original_close = [], GlobalBatchIterator.close

    def close(self):
        closed.append(self)
        original_close(self)

    monkeypatch.setattr(GlobalBatchIterator, "close", close)
    with pytest.raises(UserError, match=r"none of the checkpoints \[6, 3\]"):
        train(config(latents, **{"model.hidden_size": 32}), str(tmp_path))
    assert (tmp_path / "config.json").read_text() == written  # the run keeps its own config
    assert len(closed) == 1  # the input pipeline (and its workers) stopped with the error


def test_sample_and_convert_read_a_training_run(uninterrupted, tmp_path):
    """A run's workdir is a checkpoint for the other entry points (its latest EMA params)."""
    straight, _ = uninterrupted
    out = run_module("launch.sample", "--config", "configs/lightningdit.py:tiny", "--workdir",
                     str(tmp_path / "samples"), "--checkpoint", straight, "--num_samples", "4")
    assert json.loads(out.strip().splitlines()[-1])["shape"] == [4, 32, 32, 3]
    run_module("launch.convert", "dit", "--config", "configs/lightningdit.py:tiny", "--input",
               straight, "--output", str(tmp_path / "ema.safetensors"))
    from safetensors.numpy import load_file

    exported = load_file(tmp_path / "ema.safetensors")
    assert "x_embedder.proj.weight" in exported


def test_restoring_a_run_s_params_item_logs_no_metadata_warning(uninterrupted, caplog):
    """orbax warns that RUN/checkpoints/<step>/params has no metadata file of its own (the
    step has it); `launch.params_io` drops that warning, and only that one."""
    from absl import logging as absl_logging

    from launch import params_io

    straight, _ = uninterrupted
    item = os.path.join(params_io.latest_checkpoint(straight), "params")
    with caplog.at_level("WARNING"):
        params_io.restore_params(item, None)
    assert "Metadata file does not exist" not in caplog.text
    notice = next(f for f in absl_logging.get_absl_logger().filters
                  if isinstance(f, params_io.ItemMetadataNotice))
    absl_logging.get_absl_logger().removeFilter(notice)
    try:  # the control: without the filter orbax's warning reaches the log
        with caplog.at_level("WARNING"):
            params_io.restore_params(item, None)
        assert "Metadata file does not exist" in caplog.text
    finally:
        absl_logging.get_absl_logger().addFilter(notice)


def test_transfer_guard_steady_state_makes_no_implicit_copies(latents, tmp_path):
    """`transfer_guard='disallow'`: after the compiling step, batches, metrics, checkpoints and
    sample grids move between host and devices only by explicit copies."""
    summary = train(config(latents, total_steps=4, log_every=2, ckpt_every=3, sample_every=2,
                           transfer_guard="disallow"), str(tmp_path))
    assert summary["final_step"] == 4 and summary["compilations"] == 1
    assert np.isfinite(summary["loss"]) and sorted(losses(tmp_path)) == [2, 4]
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [3, 4]
    assert (tmp_path / "images" / "samples_00000004.png").exists()



def _host_batches_after_the_first(monkeypatch):
    """The batch left on the host (numpy) and handed to the jitted step."""
    original = GlobalBatchIterator.__next__

    def next_batch(self):
        batch = original(self)
        return batch if self.step == 1 else jax.device_get(batch)

    monkeypatch.setattr(GlobalBatchIterator, "__next__", next_batch)


def _unsharded_batches_after_the_first(monkeypatch):
    """The batch put on the default device without its sharding: the step moves it."""
    original = GlobalBatchIterator.__next__

    def next_batch(self):
        batch = original(self)
        return batch if self.step == 1 else jax.device_put(jax.device_get(batch))

    monkeypatch.setattr(GlobalBatchIterator, "__next__", next_batch)


def _step_read_back_before_a_save(monkeypatch):
    """`int()` of the state's step counter (on the devices) before a checkpoint."""
    from launch.training.checkpointing import Checkpointer

    original = Checkpointer.save

    def save(self, step, *, state, **kwargs):
        return original(self, int(state.step), state=state, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", save)


@pytest.mark.parametrize(("introduce", "direction"), [
    (_host_batches_after_the_first, "host-to-device"),
    (_unsharded_batches_after_the_first, "device-to-device"),
    (_step_read_back_before_a_save, "device-to-host")])
def test_transfer_guard_rejects_an_implicit_copy(latents, tmp_path, monkeypatch, introduce,
                                                 direction):
    """The negative control: an implicit copy slipped into the steady state raises."""
    if direction == "device-to-host" and jax.default_backend() == "cpu":
        pytest.skip("XLA:CPU gives numpy the device buffer without a copy, so JAX never "
                    "guards device-to-host reads there (jax-ml/jax#16602)")
    introduce(monkeypatch)
    with pytest.raises(jax.errors.JaxRuntimeError, match=f"Disallowed {direction} transfer"):
        train(config(latents, total_steps=2, ckpt_every=2, transfer_guard="disallow"),
              str(tmp_path))


def test_transfer_guard_level_is_checked(latents, tmp_path):
    from launch.cli import UserError

    with pytest.raises(UserError, match="config.transfer_guard='strict'"):
        train(config(latents, transfer_guard="strict"), str(tmp_path))
    with pytest.raises(UserError, match="config.nan_policy='ignore'"):
        train(config(latents, nan_policy="ignore"), str(tmp_path))
    with pytest.raises(UserError, match="config.train.global_batch_size=0"):
        train(config(latents, **{"train.global_batch_size": 0}), str(tmp_path))


@pytest.mark.slow  # ~60 s on 2 CPU cores, mostly compiling the VA-VAE step
def test_transfer_guard_vavae_steady_state(tmp_path):
    from configs.vavae import get_config as vavae_config
    from launch.data.procedural import write_shapes_dataset

    c = vavae_config("tiny")
    c.update(total_steps=4, log_every=2, ckpt_every=3, sample_every=2, transfer_guard="disallow")
    c.data.update(path=str(write_shapes_dataset(tmp_path / "shapes", image_size=32,
                                                images_per_class=4)),
                  procedural_images_per_class=0)
    c.mesh.update(data=2, fsdp=4)
    summary = train(c, str(tmp_path / "run"))
    assert summary["final_step"] == 4 and summary["compilations"] == 1
    assert (tmp_path / "run" / "images" / "samples_00000004.png").exists()
