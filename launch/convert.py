"""Convert weights between upstream PyTorch files and JAX, for every model in `launch.converters`.

    python -m launch.convert dit --config configs/lightningdit.py:xl1_800ep \
        --input lightningdit-xl-imagenet256-800ep.pt --output runs/xl800_params
    python -m launch.convert dit --input runs/xl1 --output xl1_ema.pt       # a launch.train run
    python -m launch.convert dit --input runs/xl1 --output xl1_raw.safetensors --raw
    python -m launch.convert vavae --config configs/vavae.py:long_stage3 \
        --input vavae-imagenet256-f16d32-dinov2.pt --output runs/vavae_params
    python -m launch.convert vavae --input runs/vavae_s3 --output vavae.pt [--keep_vf_proj]
    python -m launch.convert discriminator --input runs/vavae_s3 --output disc.pt
    python -m launch.convert dinov2 --config configs/vavae.py:long_stage3 \
        --input dinov2_vitl14_pretrain.pth --output runs/dinov2_params
    python -m launch.convert lpips --input lpips_module.pth --output runs/lpips_params
    python -m launch.convert inception --input pt_inception.pth --output runs/inception_params
    python -m launch.convert latent_stats --input latents_stats.pt --output latents_stats.npz

The direction follows the paths. JAX side: an orbax params directory, or a `launch.train`
workdir (its latest checkpoint: the inference weights, e.g. the EMA; `--raw` for the trained
ones), or an `.npz` for `latent_stats`. Upstream side: a `.pt` / `.pth` / `.ckpt` / `.bin` /
`.safetensors` file (read with torch.load(weights_only=True): never runs pickled code).
`--config` describes the model; without it, a run's own config, or upstream's released model.
Mistakes (a missing input, an unknown name, a config that does not fit the weights, an
existing output without `--overwrite`) end in one `error:` line and exit status 1. The output
appears whole or not at all (written under a temporary name, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from launch import cli, converters, params_io
from launch.cli import UserError
from launch.converters import Options
from torchport import TORCH_SUFFIXES, ConversionError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Model config (path:variant); default: a run's own config, else the "
    "upstream model.", lock_config=True)
_INPUT = flags.DEFINE_string("input", None, "Weights to read (file, params directory or run).",
                             required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write (upstream file, .npz or a new "
                              "params directory).", required=True)
_RAW = flags.DEFINE_bool("raw", False, "Raw weights instead of the EMA (runs, upstream "
                         "training checkpoints).")
_KEEP_VF_PROJ = flags.DEFINE_bool(
    "keep_vf_proj", False, "vavae: keep the VF projection `linear_proj` (needed to resume "
    "training; inference drops it).")
_LAYOUT = flags.DEFINE_enum("layout", None, ["timm", "torch_hub", "hf", "hf_legacy"],
                            "dinov2: key layout (reading: detected; writing: timm).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")

UPSTREAM_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors")
CONFIG_FILES = {"lightningdit": "configs/lightningdit.py", "vavae": "configs/vavae.py"}


def _side(conv: converters.Converter, path: str, flag: str) -> str:
    """'torch' (an upstream file) or 'jax' (an orbax directory or a native file)."""
    if conv.native_suffix and path.endswith(conv.native_suffix):
        return "jax"
    if flag == "--output" and path.endswith(".npz"):  # else: an orbax directory named .npz
        raise UserError(f"--output {path}: `{conv.name}` writes no .npz (only latent_stats "
                        f"does); give an upstream file ({', '.join(UPSTREAM_SUFFIXES)}) or a "
                        "params directory")
    if path.endswith(UPSTREAM_SUFFIXES) or (flag == "--input" and path.endswith(".npz")):
        return "torch"
    if flag == "--output" or os.path.isdir(path):
        return "jax"
    raise UserError(f"{flag} {path}: expected an upstream file ({', '.join(UPSTREAM_SUFFIXES)})"
                    ", an orbax params directory or a launch.train workdir")


def _check_config(conv: converters.Converter, config) -> None:
    if config is None:
        return
    if not conv.families:
        raise UserError(f"`{conv.name}` takes no --config (its model has one configuration)")
    family = config.get("family")
    if family not in conv.families:
        wanted = " or ".join(CONFIG_FILES[f] for f in conv.families)
        raise UserError(f"`{conv.name}` needs a config of {wanted}; --config is a "
                        f"{family!r} config")


def _read_jax(conv: converters.Converter, path: str):
    if conv.native_suffix and path.endswith(conv.native_suffix):
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    try:
        return params_io.restore_params(path, None)
    except (FileNotFoundError, ValueError) as e:
        cause = e.__cause__ if isinstance(e, UserError) and e.__cause__ else e
        raise UserError(f"--input {path} is not an orbax params directory or a launch.train "
                        f"workdir ({type(cause).__name__}: {str(cause)[:300]})") from e


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def convert(name: str, src: str, dst: str, *, config: ml_collections.ConfigDict | None = None,
            options: Options | None = None, overwrite: bool = False) -> dict:
    """Convert `src` into `dst` with the converter `name`; returns a summary.

    Raises `UserError` for every mistake the user can fix (see the module docstring)."""
    conv = converters.get(name)
    options = options or Options()
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.exists(src):
        raise UserError(f"--input {src} does not exist")
    if os.path.exists(dst) and not overwrite:
        raise UserError(f"--output {dst} exists (pass --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise UserError(f"--output {dst}: its folder {parent} does not exist")
    step_dir = params_io.latest_checkpoint(src) if os.path.isdir(src) else None
    src_side = "run" if step_dir else _side(conv, src, "--input")
    dst_side = _side(conv, dst, "--output")
    if src_side != "torch" and dst_side != "torch":
        raise UserError(f"--input {src} and --output {dst} are both on the JAX side; one of "
                        f"them must be an upstream file ({', '.join(UPSTREAM_SUFFIXES)})")
    if step_dir is not None:
        with_runs = [c.name for c in converters.CONVERTERS.values() if c.from_run]
        if conv.from_run is None:
            raise UserError(f"a launch.train run does not hold `{name}` weights (runs export: "
                            f"{', '.join(with_runs)})")
        run_config = params_io.run_config(step_dir)
        if run_config.get("family") not in conv.families:
            raise UserError(f"{src} is a {run_config.get('family')!r} run; `{name}` exports "
                            f"from {' or '.join(conv.families)} runs")
        if config is None:
            config = ml_collections.ConfigDict(run_config)
    _check_config(conv, config)
    model = conv.build(config, options)
    try:
        if src_side == "torch":
            tree = conv.read_torch(src, model, options)
        else:
            tree = conv.from_run(step_dir, options) if step_dir else _read_jax(conv, src)
            if step_dir or os.path.isdir(src):
                params_io.check_tree(tree, conv.abstract(model), src)
        # written under a temporary name beside `dst` (same suffix), then renamed: a failed or
        # killed conversion leaves no partial output, and --overwrite keeps the old one until
        # the new one is whole
        tmp = os.path.join(parent, f".{os.getpid()}.tmp.{os.path.basename(dst)}")
        try:
            if dst_side == "torch":
                conv.write_torch(tmp, tree, model, options)
            elif conv.native_suffix and dst.endswith(conv.native_suffix):
                converters.save_npz(tmp, tree)
            else:
                params_io.save_params(tmp, tree)
            if os.path.exists(dst):
                _remove(dst)
            os.replace(tmp, dst)
        finally:
            if os.path.lexists(tmp):
                _remove(tmp)
    except (ConversionError, ValueError) as e:  # the weights do not fit, unreadable files
        raise UserError(str(e)) from e
    leaves = jax.tree.leaves(tree)
    return {"converter": name, "input": src, "output": dst, "arrays": len(leaves),
            "values": int(sum(np.size(x) for x in leaves))}


def main(argv):
    if len(argv) != 2:
        raise UserError(f"usage: python -m launch.convert {{{'|'.join(converters.CONVERTERS)}}} "
                        "--input ... --output ... [--config ...]")
    options = Options(raw=_RAW.value, keep_vf_proj=_KEEP_VF_PROJ.value, layout=_LAYOUT.value)
    summary = convert(argv[1], _INPUT.value, _OUTPUT.value, config=_CONFIG.value,
                      options=options, overwrite=_OVERWRITE.value)
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
