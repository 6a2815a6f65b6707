"""State-dict I/O, key prefixes, abstract variables and rule tables shared by the converters."""

import jax
import numpy as np
import pytest
import torch
from flax import linen as nn

from torchport import (
    ConversionError,
    Rule,
    UnsafeCheckpointError,
    abstract_variables,
    conv_to_flax,
    conv_to_torch,
    linear_to_flax,
    linear_to_torch,
    load_state_dict,
    save_state_dict,
    strip_prefixes,
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


def test_strip_prefixes_contract():
    sd = {"module._orig_mod.a": 1, "_orig_mod.module.loss.d.w": 2, "loss.d.b": 3}
    assert strip_prefixes(sd) == {"a": 1, "loss.d.w": 2, "loss.d.b": 3}
    # `under`: only the sub-module's entries, stripped, when there are any ...
    assert strip_prefixes(sd, under="loss.d.") == {"w": 2, "b": 3}
    # ... else everything (a bare sub-module state dict)
    assert strip_prefixes({"w": 1}, under="loss.d.") == {"w": 1}
    assert load_state_dict({"state_dict": {"module.loss.d.w": np.ones(2), "x": np.ones(1)}},
                           select=("state_dict",), under="loss.d.").keys() == {"w"}


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Dense(3, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
        return nn.BatchNorm(use_running_average=not train)(x)


def test_abstract_variables_are_unboxed_shapes():
    x = jax.ShapeDtypeStruct((1, 5), np.float32)
    params = abstract_variables(_Net(), x, train=False)
    assert params["Dense_0"]["kernel"] == jax.ShapeDtypeStruct((5, 3), np.float32)  # unboxed
    both = abstract_variables(_Net(), x, collections=("params", "batch_stats"), train=False)
    assert set(both) == {"params", "batch_stats"}
    assert both["batch_stats"]["BatchNorm_0"]["mean"].shape == (3,)
    # and the upstream shapes of an abstract tree, without allocating
    shapes = to_torch({"lin": {"kernel": jax.ShapeDtypeStruct((2, 3), np.float32),
                               "bias": jax.ShapeDtypeStruct((3,), np.float32)},
                       "conv": {"kernel": jax.ShapeDtypeStruct((2, 1, 3, 4), np.float32)}},
                      RULES, what="toy")
    assert {k: v.shape for k, v in shapes.items()} == {k: v.shape for k, v in SD.items()}


class _Payload:
    """Unpickling this would run code (create a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "obj": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle .*evil\.pt: it holds "
                                                     r"a Python object \(\S*open\)"):
        load_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(ValueError, match="weights_only=True"):  # a ValueError for callers
        load_state_dict(tmp_path / "evil.pt")


def test_zero_dim_entries_stay_zero_dim(tmp_path):
    sd = {"bn.num_batches_tracked": np.asarray(7, np.int64), "w": np.ones((2, 2), np.float32).T}
    for suffix in (".pt", ".safetensors"):
        save_state_dict(tmp_path / f"s{suffix}", sd)
        got = load_state_dict(tmp_path / f"s{suffix}")
        assert got["bn.num_batches_tracked"].shape == () and got["bn.num_batches_tracked"] == 7


def test_bfloat16_arrays_are_written_bit_for_bit(tmp_path):
    """bf16 params (numpy's ml_dtypes bfloat16, which torch.from_numpy refuses) -> bf16 .pt."""
    w = (np.arange(12, dtype=np.float32).reshape(3, 4) / 7).astype(jax.numpy.bfloat16)
    save_state_dict(tmp_path / "b.pt", {"w": w})
    raw = torch.load(tmp_path / "b.pt", weights_only=True)
    assert raw["w"].dtype == torch.bfloat16
    np.testing.assert_array_equal(load_state_dict(tmp_path / "b.pt")["w"], w.astype(np.float32))
