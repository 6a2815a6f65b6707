"""Encode an image dataset into VA-VAE latents in upstream's layout (resumable, multi-host).

    python -m launch.extract_latents --config configs/vavae.py:long_stage3 \
        --config.data.path /data/imagenet/train --workdir /data/latents/imagenet_train_256 \
        --checkpoint vavae-imagenet256-f16d32-dinov2.pt
    python -m launch.extract_latents --config configs/vavae.py:tiny --workdir runs/latents

`--checkpoint` is a released / Lightning `.pt`/`.ckpt` (converted on the fly), an orbax params
directory (`launch.convert vavae`), or a VA-VAE training run's workdir (its latest `params`).
The `tiny` config runs without one on random weights (and says so).

As upstream's extract_features.py: the ADM center crop of `config.data.image_size`, a posterior
*sample* of each image and of its exact mirror, files
`latents_rank{r:02d}_shard{s:03d}.safetensors` (`latents`, `latents_flip` NCHW float32,
`labels` int64, `config.extract.shard_size` rows), then `latents_stats.pt` from
`config.extract.stats_images` random images. Process r encodes images r, r + P, r + 2P, ...
(upstream's unshuffled DistributedSampler, without its padding duplicates), each global batch
sharded over every device. Each image's noise is keyed by its index, so a rerun after a kill
skips the complete shards and produces exactly the latents one uninterrupted run would.
Undecodable images are skipped and counted. `summary.json` records the totals.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from launch import cli, distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "VA-VAE config (path:variant).",
                                          lock_config=True)
flags.mark_flag_as_required("config")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory of the latents.",
                               required=True)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "VA-VAE weights: upstream .pt/.ckpt, an orbax params directory or a "
    "training workdir. Only the tiny config may omit it (random weights).")
cli.path_flag("workdir")


def main(argv):
    del argv
    distributed.initialize()
    from launch.data.extraction import extract_latents

    extract_latents(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value)


if __name__ == "__main__":
    cli.run(main)
