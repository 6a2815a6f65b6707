"""`launch.convert vavae` / `dinov2`: training checkpoint -> orbax -> PyTorch, as a user runs it."""

import numpy as np
import torch
from helpers import run_module as _run
from safetensors.numpy import load_file

# configs/vavae.py:tiny reshaped to the golden tiny VA-VAE (ch 32, five levels, 16x16 latents)
VAVAE_TINY = [
    "--config", "configs/vavae.py:tiny", "--config.model.embed_dim=32",
    "--config.model.ddconfig.z_channels=32", "--config.model.ddconfig.ch=32",
    "--config.model.ddconfig.ch_mult=(1,1,1,1,2)", "--config.model.ddconfig.num_res_blocks=2",
    "--config.model.ddconfig.attn_resolutions=(16,)", "--config.model.ddconfig.resolution=256",
]


def test_convert_vavae_training_checkpoint(golden, tmp_path):
    sd = {**golden("vavae_tiny_params_encoder").params,
          **golden("vavae_tiny_params_decoder").params}
    sd = {k: v.astype(np.float32) for k, v in sd.items()}
    # a Lightning checkpoint with the training extras the converter must skip
    extras = {"foundation_model.model.cls_token": np.zeros((1, 1, 32), np.float32),
              "loss.logvar": np.zeros((), np.float32)}
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in {**sd, **extras}.items()},
                "epoch": 3}, ckpt)
    _run("launch.convert", "vavae", *VAVAE_TINY, "--input", str(ckpt), "--output",
         str(tmp_path / "params"))
    _run("launch.convert", "vavae", *VAVAE_TINY, "--input", str(tmp_path / "params"),
         "--output", str(tmp_path / "back.safetensors"))
    back = load_file(tmp_path / "back.safetensors")
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_convert_dinov2_timm_to_hf_layout(golden, tmp_path):
    timm = golden("dinov2_timm_tiny").params
    src = tmp_path / "dinov2.pth"
    torch.save({k: torch.from_numpy(v) for k, v in timm.items()}, src)
    config = ["--config", "configs/vavae.py:tiny", "--config.foundation.size=L"]
    _run("launch.convert", "dinov2", *config, "--input", str(src), "--output",
         str(tmp_path / "params"))
    _run("launch.convert", "dinov2", *config, "--input", str(tmp_path / "params"), "--output",
         str(tmp_path / "hf.pt"), "--layout", "hf")
    hf = torch.load(tmp_path / "hf.pt", weights_only=True)
    want = golden("dinov2_hf_tiny").params
    assert sorted(hf) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(hf[key].numpy(), value, err_msg=key)


def test_params_directory_restores_without_a_target_tree(tmp_path):
    from launch.params_io import restore_params, save_params

    tree = {"encoder": {"kernel": np.ones((3, 2), np.float32)}, "bias": np.arange(4.0)}
    save_params(tmp_path / "p", tree)
    back = restore_params(tmp_path / "p", None)  # the stored tree, on one device
    np.testing.assert_array_equal(back["encoder"]["kernel"], tree["encoder"]["kernel"])
    np.testing.assert_array_equal(back["bias"], tree["bias"])
