"""Sample images from a LightningDiT: a labelled PNG grid, or 50,000 images for FID.

    # a grid from the tiny demo model (random weights unless --checkpoint)
    python -m launch.sample --config configs/lightningdit.py:tiny --workdir runs/samples
    # ADM-format batch for the paper's FID, from a released checkpoint (or a training workdir)
    python -m launch.sample --config configs/lightningdit.py:xl1_800ep --workdir runs/fid50k \
        --checkpoint lightningdit-xl-imagenet256-800ep.pt \
        --config.tokenizer.variant long_stage3 \
        --config.tokenizer.checkpoint vavae-imagenet256-f16d32-dinov2.pt \
        --config.latent_stats latents_stats.pt \
        --num_samples 50000 --config.sample.batch_size 256

`--checkpoint`: an upstream `.pt`/`.safetensors` (its EMA weights), an orbax params directory,
or a `launch.train` workdir (its latest EMA weights). The latents are decoded by the VA-VAE of
`config.tokenizer` (a configs/vavae.py variant and its weights) after de-normalising with
`config.latent_stats` (or the statistics of `config.data.path`). Every sampler option is a
config field: --config.sample.{method,num_steps,cfg_scale,cfg_interval_start,timestep_shift,
cfg_channels,batch_size}.

Writes `samples.npz` (ADM layout: `arr_0` uint8 NHWC, `arr_1` labels; latents when no
tokenizer is configured) and `samples.png`, a grid of the first `--grid` samples with their
classes. Sampling runs over every device of every process in chunks of `--chunk_size`; rerun
the same command after a kill and the finished chunks are kept (see `launch.sampling`).
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from launch import cli, distributed, sampling

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path:variant).",
                                          lock_config=True)
flags.mark_flag_as_required("config")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Upstream .pt/.safetensors, an orbax params directory or a training "
    "run's workdir (its latest EMA weights); default: a randomly initialised model (zero "
    "velocity: the samples are decoded noise).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 16, "Number of samples.", lower_bound=1)
_LABELS = flags.DEFINE_list("labels", None, "Class labels (cycled); default: random classes.")
_BALANCED = flags.DEFINE_bool("balanced", False,
                              "Each class equally often (random order) instead of random classes.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 1024,
                                   "Images per resumable chunk (rounded to whole batches).",
                                   lower_bound=1)
_MAX_CHUNKS = flags.DEFINE_integer("max_chunks", None,
                                   "Stop after writing this many new chunks (rerun to go on).",
                                   lower_bound=1)
_GRID = flags.DEFINE_integer("grid", 64, "Samples shown in samples.png (0: none).",
                             lower_bound=0)
cli.path_flag("workdir")


def main(argv):
    del argv
    distributed.initialize()
    summary = sampling.run_sampling(
        _CONFIG.value, _WORKDIR.value, checkpoint=_CHECKPOINT.value,
        num_samples=_NUM_SAMPLES.value, labels=_LABELS.value, balanced=_BALANCED.value,
        chunk_size=_CHUNK_SIZE.value, max_chunks=_MAX_CHUNKS.value, grid=_GRID.value)
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
