"""Entry points run as a user runs them: sampling demo and checkpoint conversion."""

import json

import numpy as np
import torch
from helpers import run_module as _run

TINY_OVERRIDES = [  # the tiny config reshaped to the architecture of the golden DiT case
    "--config.model.hidden_size=64", "--config.model.num_heads=4",
    "--config.model.in_channels=32", "--config.model.patch_size=1",
    "--config.model.num_classes=10",
]


def test_sample_demo(tmp_path):
    out = _run("launch.sample", "--config", "configs/lightningdit.py:tiny", "--workdir",
               str(tmp_path), "--num_samples", "6", "--labels", "1,2,3")
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["shape"] == [6, 32, 32, 3]  # decoded by the tiny VA-VAE
    data = np.load(tmp_path / "samples.npz")
    assert data["arr_0"].shape == (6, 32, 32, 3) and data["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(data["arr_1"], [1, 2, 3, 1, 2, 3])
    assert (tmp_path / "samples.png").stat().st_size > 0


def test_convert_torch_orbax_torch_and_sample(golden, tmp_path):
    g = golden("dit_p1_qknorm0")
    src = tmp_path / "upstream.pt"
    torch.save({"ema": {k: torch.from_numpy(v) for k, v in g.params.items()}}, src)
    config = ["--config", "configs/lightningdit.py:tiny", *TINY_OVERRIDES]
    _run("launch.convert", "dit", *config, "--input", str(src), "--output",
         str(tmp_path / "params"))
    _run("launch.convert", "dit", *config, "--input", str(tmp_path / "params"), "--output",
         str(tmp_path / "back.pt"))
    back = torch.load(tmp_path / "back.pt", weights_only=True)["ema"]
    assert list(back) == list(g.params)
    for key, value in g.params.items():
        np.testing.assert_allclose(back[key].numpy(), value, atol=6e-8, rtol=0, err_msg=key)
    # the converted orbax params sample, with the released sampling settings
    out = _run("launch.sample", *config, "--workdir", str(tmp_path / "s"), "--checkpoint",
               str(tmp_path / "params"), "--num_samples", "2", "--config.sample.batch_size=2",
               "--config.sample.cfg_channels=3", "--config.tokenizer.variant=")
    assert json.loads(out.strip().splitlines()[-1])["shape"] == [2, 8, 8, 32]  # latents
