"""Metrics and progress: TensorBoard event files, `metrics.jsonl`, a progress line, PNG grids.

TensorBoard files are written with tensorboardX's protos and record writer (no TensorFlow in
the training process), synchronously: tensorboardX's `SummaryWriter` hands events to a thread
that writes them every 2 minutes, and a killed run lost them.
Every logged step appends one JSON object to `WORKDIR/metrics.jsonl` with at least `step` and
`loss` (the optimised total). Only process 0 writes; the other processes keep the same object
with writing switched off, so callers never branch on the process.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
from absl import logging

# dense bf16 peaks per device, for the MFU column (None: not reported)
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12,
    "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v4": 275e12,
    "TPU v6 lite": 918e12,
}


def peak_flops_per_device() -> float | None:
    import jax

    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    h, rem = divmod(int(seconds), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def drop_records_after(path: str, step: int) -> None:
    """Keep the records of `metrics.jsonl` up to `step` (the checkpoint a run resumed from).

    A line that is not a whole record is dropped with a warning: a run killed while writing
    (or a full disk, or a network file system) can leave its last line cut, and the log must
    never stop a run from resuming."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                logging.warning("%s:%d is not a whole metrics record (a run killed while "
                                "writing it?); dropped: %.80r", path, number, line)
                continue
            if record_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class EventFile:
    """One TensorBoard event file in `logdir`, each event on disk when its call returns.

    `purge_step`: the run's first step. TensorBoard then hides what an earlier run in this
    `logdir` logged from that step on (a stopped run, whose steps since its last checkpoint are
    logged again), as metrics.jsonl drops it."""

    def __init__(self, logdir: str, purge_step: int | None = None):
        # tensorboardX is imported when a run logs, not with this module (it imports torch)
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        os.makedirs(logdir, exist_ok=True)
        # the pid keeps a resumed run in the same second off the stopped run's file name
        self._writer = EventsWriter(os.path.join(logdir, "events"), f".{os.getpid()}")
        if purge_step is not None:
            self._write(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))

    def _write(self, event) -> None:
        event.wall_time = time.time()
        self._writer.write_event(event)
        self._writer.flush()

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Every (tag, value) of `values` in one event at `step`."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import scalar

        tagged = [v for tag, value in values.items() for v in scalar(tag, value).value]
        self._write(Event(step=step, summary=Summary(value=tagged)))

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """A uint8 (H, W, 3) image, PNG-encoded, at `step`."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import image as image_summary

        self._write(Event(step=step, summary=image_summary(tag, image, dataformats="HWC")))

    def close(self) -> None:
        self._writer.close()


class MetricLogger:
    """Writes scalars and images for one run; `write` also prints the progress line."""

    def __init__(self, workdir: str, *, total_steps: int, batch_size: int,
                 flops_per_example: float | None = None, num_devices: int = 1,
                 enabled: bool = True, start_step: int = 0):
        self.workdir = workdir
        self.total_steps = total_steps
        self.batch_size = batch_size
        # forward + backward, 2*MAC convention (None when XLA could not count it)
        self.flops_per_example = (flops_per_example if flops_per_example
                                  and math.isfinite(flops_per_example) else None)
        self.num_devices = num_devices
        self.peak = peak_flops_per_device()
        self.enabled = enabled
        self._events = None
        self._jsonl = None
        if enabled:
            self._events = EventFile(os.path.join(workdir, "tensorboard"),
                                     purge_step=start_step + 1)
            path = os.path.join(workdir, "metrics.jsonl")
            drop_records_after(path, start_step)  # steps redone after a resume are re-logged
            self._jsonl = open(path, "a")  # noqa: SIM115
        self._last_time = None
        self._last_step = None

    def start(self, step: int) -> None:
        """Start the clock (after compilation) at `step`."""
        self._last_time, self._last_step = time.perf_counter(), step

    def write(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Log `metrics` (host floats) at `step`, with throughput since the last call."""
        now = time.perf_counter()
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        if self._last_time is not None and step > self._last_step:
            seconds_per_step = (now - self._last_time) / (step - self._last_step)
            record["examples_per_sec"] = self.batch_size / seconds_per_step
            if self.flops_per_example:
                per_device = self.flops_per_example * record["examples_per_sec"] / self.num_devices
                record["tflops_per_device"] = per_device / 1e12
                if self.peak:
                    record["mfu"] = per_device / self.peak
            eta = seconds_per_step * (self.total_steps - step)
        else:
            eta = float("nan")
        self._last_time, self._last_step = now, step
        if self.enabled:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
            self._events.scalars({k: v for k, v in record.items() if k != "step"}, step)
            logging.info("%s", self.progress_line(record, eta))
        return record

    def progress_line(self, record: dict, eta: float) -> str:
        parts = [f"step {record['step']}/{self.total_steps}"]
        for key, value in record.items():
            if key in ("step", "examples_per_sec", "tflops_per_device", "mfu"):
                continue
            parts.append(f"{key} {value:.4g}")
        if "examples_per_sec" in record:
            parts.append(f"{record['examples_per_sec']:.1f} ex/s")
        if "tflops_per_device" in record:
            parts.append(f"{record['tflops_per_device']:.2f} TFLOP/s/dev")
        if "mfu" in record:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        parts.append(f"ETA {format_eta(eta)}")
        return " | ".join(parts)

    def write_grid(self, step: int, name: str, grid: np.ndarray) -> str | None:
        """Save a uint8 (H, W, 3) grid as `WORKDIR/images/{name}_{step:08d}.png` and in TB."""
        if not self.enabled:
            return None
        from PIL import Image

        path = os.path.join(self.workdir, "images", f"{name}_{step:08d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(grid).save(path)
        self._events.image(name, grid, step)
        return path

    def close(self) -> None:
        if self.enabled:
            self._events.close()
            self._jsonl.close()
