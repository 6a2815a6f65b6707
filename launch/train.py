"""Train LightningDiT or VA-VAE: `python -m launch.train --config=... --workdir=...`.

    python -m launch.train --config configs/vavae.py:tiny --workdir runs/vavae_tiny
    python -m launch.train --config configs/lightningdit.py:xl1_64ep --workdir runs/xl1 \
        --config.data.path /data/latents/imagenet_train_256
    python -m launch.train --config configs/lightningdit.py:tiny --workdir runs/dit_tiny \
        --config.total_steps=200 --config.log_every=20

Rerun the same command to continue a run. SIGTERM / Ctrl-C saves a checkpoint and stops.
Multi-process: --coordinator_address=HOST:PORT --num_processes=N --process_id=I, or
JAX_DISTRIBUTED=1 on TPU pods and SLURM (see launch/distributed.py).
"""

from __future__ import annotations

import json
import os

from absl import flags
from ml_collections import config_flags

from launch import cli, distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path:variant).",
                                          lock_config=True)
flags.mark_flag_as_required("config")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, images).",
                               required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.",
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.", lower_bound=0)
cli.path_flag("workdir")


def main(argv):
    del argv
    if _COORDINATOR.value:
        os.environ.update(JAX_COORDINATOR_ADDRESS=_COORDINATOR.value,
                          JAX_NUM_PROCESSES=str(_NUM_PROCESSES.value),
                          JAX_PROCESS_ID=str(_PROCESS_ID.value))
    distributed.initialize()
    from launch.training.loop import ensure_workdir, train

    config, workdir = _CONFIG.value, _WORKDIR.value
    ensure_workdir(workdir)
    summary = train(config, workdir)
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
