"""Multi-process start-up shared by the entry points.

- TPU pod slices and SLURM/Open MPI GPU clusters: `jax.distributed.initialize()` detects the
  cluster by itself; set `JAX_DISTRIBUTED=1` (the TPU pod scripts do) to call it.
- Any other set of hosts (and the multi-process CPU tests): set `JAX_COORDINATOR_ADDRESS`
  (host:port of process 0), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` on every process.

CPU processes exchange collectives through gloo. Single-process runs need nothing.
"""

from __future__ import annotations

import os

import jax


def initialize() -> None:
    """Join the process group described by the environment (a no-op for one process)."""
    num_processes = os.environ.get("JAX_NUM_PROCESSES")
    if num_processes is not None and int(num_processes) > 1:
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(num_processes), process_id=int(os.environ["JAX_PROCESS_ID"]))
    elif os.environ.get("JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()
