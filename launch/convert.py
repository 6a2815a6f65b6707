"""Convert checkpoints between upstream PyTorch files and orbax params directories.

    python -m launch.convert dit --config configs/lightningdit.py:xl1_800ep \
        --input lightningdit-xl-imagenet256-800ep.pt --output runs/xl800_params
    python -m launch.convert dit --config configs/lightningdit.py:xl1_800ep \
        --input runs/xl800_params --output exported.pt      # or exported.safetensors
    python -m launch.convert vavae --config configs/vavae.py:long_stage3 \
        --input vavae-imagenet256-f16d32-dinov2.pt --output runs/vavae_params
    python -m launch.convert dinov2 --config configs/vavae.py:long_stage3 \
        --input dinov2_vitl14_pretrain.pth --output runs/dinov2_params

The direction follows the paths: a directory is an orbax params checkpoint, a `.pt` / `.pth` /
`.ckpt` / `.safetensors` file is upstream's layout. The config describes the architecture.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from launch import params_io
from torchport import save_state_dict

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config (path:variant).",
                                          lock_config=True)
_INPUT = flags.DEFINE_string("input", None, "Checkpoint to read.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write.", required=True)
_KEEP_VF_PROJ = flags.DEFINE_bool(
    "keep_vf_proj", False, "vavae: keep the VF projection `linear_proj` (needed to resume "
    "training; inference drops it).")
_LAYOUT = flags.DEFINE_enum("layout", "timm", ["timm", "torch_hub", "hf", "hf_legacy"],
                            "dinov2: key layout written when exporting to PyTorch.")

TORCH_FORMATS = (".pt", ".pth", ".ckpt", ".safetensors")


def _dit(config):
    from dit_jax.convert import abstract_params, params_from_torch, save_torch_checkpoint
    from dit_jax.model import LightningDiT
    from launch.build import dit_architecture

    kwargs = dit_architecture(config)
    return (abstract_params(LightningDiT(**kwargs)),
            lambda path: params_from_torch(path, **kwargs),
            lambda path, params: save_torch_checkpoint(path, params, **kwargs))


def _vavae(config):
    from launch.build import autoencoder
    from vavae_jax.convert import abstract_params, params_from_torch, params_to_torch

    use_vf = 1024 if _KEEP_VF_PROJ.value else None  # DINOv2 ViT-L/14 width
    model = autoencoder(config, use_vf)

    def write(path, params):
        save_state_dict(path, params_to_torch(params, model=model))

    return (abstract_params(model),
            lambda path: params_from_torch(path, model=model, keep_vf_proj=_KEEP_VF_PROJ.value),
            write)


def _dinov2(config):
    import jax
    from flax import linen as nn

    from vavae_jax.dinov2 import dinov2_model
    from vavae_jax.dinov2_convert import params_from_torch, params_to_torch

    model = dinov2_model(config.foundation.size, **config.foundation.overrides)
    x = jax.ShapeDtypeStruct((1, 14 * 16, 14 * 16, 3), "float32")
    abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x)["params"])

    def write(path, params):
        save_state_dict(path, params_to_torch(params, layout=_LAYOUT.value))

    return abstract, lambda path: params_from_torch(path, model), write


MODELS = {"dit": _dit, "vavae": _vavae, "dinov2": _dinov2}


def main(argv):
    if len(argv) != 2 or argv[1] not in MODELS:
        raise app.UsageError(f"usage: python -m launch.convert {{{'|'.join(MODELS)}}} "
                             "--config ... --input ... --output ...")
    abstract, read_torch, write_torch = MODELS[argv[1]](_CONFIG.value)
    src, dst = _INPUT.value, _OUTPUT.value
    if os.path.isdir(src):  # an orbax params directory or a training run's workdir
        params = params_io.restore_params(params_io.resolve_params_dir(src), abstract)
    else:
        params = read_torch(src)
    if dst.endswith(TORCH_FORMATS):
        write_torch(dst, params)
    else:
        params_io.save_params(dst, params)
    logging.info("converted %s -> %s", src, dst)


if __name__ == "__main__":
    app.run(main)
