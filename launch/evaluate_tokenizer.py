"""rFID, PSNR, SSIM and LPIPS of a VA-VAE's reconstructions of a validation set.

    python -m launch.evaluate_tokenizer --config configs/vavae.py:long_stage3 \
        --checkpoint vavae-imagenet256-f16d32-dinov2.pt \
        --config.data.path /data/imagenet/val --workdir runs/tokenizer_eval \
        --inception pt_inception-2015-12-05-6726825d.pth \
        --config.lpips.vgg16 vgg16-397923af.pth --config.lpips.heads vgg.pth

Upstream's evaluate_tokenizer.py on the 50,000 ImageNet validation images (see
`launch.tokenizer_eval` for the exact procedure). `--checkpoint` is a released `.pt`/`.ckpt`,
an orbax params directory or a VA-VAE training workdir; the tiny config may omit it and the
LPIPS files (random weights). Without `--inception` rFID is left out. Writes
`tokenizer_metrics.json` and `reconstructions.png` (originals over reconstructions) to the
workdir; the last line printed is the metrics JSON.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import flags
from ml_collections import config_flags

from launch import cli, sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "VA-VAE config (path:variant).",
                                          lock_config=True)
flags.mark_flag_as_required("config")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "VA-VAE weights (see above).")
_INCEPTION = flags.DEFINE_string("inception", None,
                                 "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (rFID).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 0, "Evaluate the first N images (0: all).",
                                   lower_bound=0)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per global batch.", lower_bound=1)
cli.path_flag("workdir")


def main(argv):
    del argv
    from launch import build
    from launch.data.extraction import load_autoencoder_params
    from launch.data.sources import open_image_source
    from launch.evaluation import inception_extractor
    from launch.images import save_grid
    from launch.tokenizer_eval import evaluate_tokenizer, load_lpips

    config, workdir = _CONFIG.value, _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.create_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    source = open_image_source(config.data)
    autoencoder = build.autoencoder(config)
    ae_params = load_autoencoder_params(config, autoencoder, _CHECKPOINT.value, mesh)
    lpips, lpips_params = load_lpips(config)
    extract = inception_extractor(_INCEPTION.value, mesh=mesh) if _INCEPTION.value else None
    result = evaluate_tokenizer(
        source, autoencoder, ae_params, lpips, lpips_params, image_size=config.data.image_size,
        batch_size=_BATCH_SIZE.value, mesh=mesh, num_images=_NUM_IMAGES.value, extract=extract,
        seed=config.seed, worker_count=config.data.get("worker_count", 0), keep=8)
    originals, recons = result.pop("examples")
    save_grid(os.path.join(workdir, "reconstructions.png"),
              np.concatenate([originals, recons]), ncols=len(originals),
              upscale=max(1, 64 // config.data.image_size))
    line = json.dumps(result)
    with open(os.path.join(workdir, "tokenizer_metrics.json"), "w") as f:
        f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    cli.run(main)
