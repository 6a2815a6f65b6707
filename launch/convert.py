"""Convert checkpoints between upstream PyTorch files and orbax params directories.

    python -m launch.convert dit --config configs/lightningdit.py:xl1_800ep \
        --input lightningdit-xl-imagenet256-800ep.pt --output runs/xl800_params
    python -m launch.convert dit --config configs/lightningdit.py:xl1_800ep \
        --input runs/xl800_params --output exported.pt      # or exported.safetensors

The direction follows the paths: a directory is an orbax params checkpoint, a `.pt` / `.pth` /
`.ckpt` / `.safetensors` file is upstream's layout. The config describes the architecture.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from launch import params_io

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config (path:variant).",
                                          lock_config=True)
_INPUT = flags.DEFINE_string("input", None, "Checkpoint to read.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write.", required=True)

TORCH_FORMATS = (".pt", ".pth", ".ckpt", ".safetensors")


def _dit(config):
    from configs.lightningdit import architecture_kwargs
    from dit_jax.convert import abstract_params, params_from_torch, save_torch_checkpoint
    from dit_jax.model import LightningDiT

    kwargs = architecture_kwargs(config)
    return (abstract_params(LightningDiT(**kwargs)),
            lambda path: params_from_torch(path, **kwargs),
            lambda path, params: save_torch_checkpoint(path, params, **kwargs))


MODELS = {"dit": _dit}


def main(argv):
    if len(argv) != 2 or argv[1] not in MODELS:
        raise app.UsageError(f"usage: python -m launch.convert {{{'|'.join(MODELS)}}} "
                             "--config ... --input ... --output ...")
    abstract, read_torch, write_torch = MODELS[argv[1]](_CONFIG.value)
    src, dst = _INPUT.value, _OUTPUT.value
    if os.path.isdir(src):
        params = params_io.restore_params(src, abstract)
    else:
        params = read_torch(src)
    if dst.endswith(TORCH_FORMATS):
        write_torch(dst, params)
    else:
        params_io.save_params(dst, params)
    logging.info("converted %s -> %s", src, dst)


if __name__ == "__main__":
    app.run(main)
