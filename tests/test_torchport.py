"""State-dict I/O and rule-table conversion shared by both converters."""

import numpy as np
import pytest
import torch

from torchport import (
    ConversionError,
    Rule,
    conv_to_flax,
    conv_to_torch,
    linear_to_flax,
    linear_to_torch,
    load_state_dict,
    save_state_dict,
    to_flax,
    to_torch,
)

SD = {
    "lin.weight": np.arange(6, dtype=np.float32).reshape(3, 2),
    "lin.bias": np.ones(3, np.float32),
    "conv.weight": np.arange(24, dtype=np.float32).reshape(4, 3, 2, 1),
    "table": np.full((2, 2), 0.5, np.float32),
}
RULES = [
    Rule("lin.weight", ("lin", "kernel"), linear_to_flax, linear_to_torch),
    Rule("lin.bias", ("lin", "bias")),
    Rule("conv.weight", ("conv", "kernel"), conv_to_flax, conv_to_torch),
    Rule("table", None, constant=np.full((2, 2), 0.5, np.float32)),
]
SHAPES = {("lin", "kernel"): (2, 3), ("lin", "bias"): (3,), ("conv", "kernel"): (2, 1, 3, 4)}


class _Shape:
    def __init__(self, shape):
        self.shape = shape


FLAX_SHAPES = {k: _Shape(v) for k, v in SHAPES.items()}


def test_rules_round_trip():
    params = to_flax(SD, RULES, FLAX_SHAPES, what="toy")
    assert params["lin"]["kernel"].shape == (2, 3)
    kernel = params["conv"]["kernel"]  # (kh, kw, in, out) from (out, in, kh, kw)
    np.testing.assert_array_equal(kernel[1, 0, 2, 3], SD["conv.weight"][3, 2, 1, 0])
    back = to_torch(params, RULES, what="toy")
    assert list(back) == list(SD)
    for k in SD:
        np.testing.assert_array_equal(back[k], SD[k])


def test_rules_report_everything_at_once():
    bad = dict(SD, extra=np.zeros(1), table=SD["table"] + 1)
    del bad["lin.bias"]
    bad["lin.weight"] = np.zeros((2, 3))
    with pytest.raises(ConversionError) as e:
        to_flax(bad, RULES, FLAX_SHAPES, what="toy", source="file.pt")
    msg = str(e.value)
    assert msg.startswith("cannot load file.pt into toy:")
    assert "missing keys (1):\n    lin.bias" in msg
    assert "unexpected keys (1):\n    extra" in msg
    assert "lin.weight: got (2, 3), expected (3, 2)" in msg
    assert "table: max |diff| 1" in msg
    params = to_flax(dict(SD, extra=np.zeros(1)), RULES, FLAX_SHAPES, what="toy",
                     ignore=lambda k: k == "extra")
    with pytest.raises(ConversionError, match="no PyTorch counterpart"):
        to_torch({**params, "stray": {"w": np.zeros(1)}}, RULES, what="toy")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".npz"])
def test_state_dict_files(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    if suffix == ".npz":
        np.savez(path, **SD)
    else:
        save_state_dict(path, SD)
    got = load_state_dict(path)
    assert sorted(got) == sorted(SD)
    for k in SD:
        np.testing.assert_array_equal(got[k], SD[k])


def test_training_checkpoint_selection_and_prefixes(tmp_path):
    path = tmp_path / "ckpt.pt"
    tensors = {f"module._orig_mod.{k}": torch.from_numpy(v) for k, v in SD.items()}
    torch.save({"state_dict": tensors, "epoch": 3, "optimizer_states": [{}]}, path)
    got = load_state_dict(path, select=("ema", "state_dict"))
    assert sorted(got) == sorted(SD)
    bf16 = {"w": torch.ones(2, dtype=torch.bfloat16), "step": 7}
    got = load_state_dict(bf16)
    assert got["w"].dtype == np.float32 and "step" not in got


def test_state_dict_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_state_dict(tmp_path / "missing.pt")
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported checkpoint format"):
        load_state_dict(tmp_path / "w.h5")
    (tmp_path / "broken.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="broken.pt"):
        load_state_dict(tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="no tensors found"):
        load_state_dict({"config": {"a": 1}}, select=("ema",))
