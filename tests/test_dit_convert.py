"""LightningDiT torch <-> flax conversion: manifests, round trips, file formats, errors."""

import functools

import jax
import numpy as np
import pytest
import torch

from dit_jax import RELEASED_FLAGS, lightningdit_kwargs
from dit_jax.convert import (
    abstract_params,
    params_from_torch,
    params_to_torch,
    save_torch_checkpoint,
)
from dit_jax.model import LightningDiT
from torchport import ConversionError, save_state_dict

MAIN = "dit_p1_qknorm0"
ROUND_TRIP_CASES = ["dit_p1_qknorm0", "dit_p1_woshift_qknorm1", "dit_p2_plain_qknorm1_learnsigma"]


@functools.cache
def _case(golden, case):
    g = golden(case)
    return g.params, LightningDiT(**g.meta["config"])


@pytest.mark.parametrize("case", ROUND_TRIP_CASES)
def test_round_trip_is_identity(golden, case):
    sd, model = _case(golden, case)
    back = params_to_torch(params_from_torch(sd, model), model)
    assert list(back) == list(sd)  # same keys, upstream registration order
    for key, value in sd.items():
        assert back[key].shape == value.shape and back[key].dtype == np.float32, key
        if key in ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin"):
            # constants recomputed here: pos_embed bit-exact, RoPE cos/sin within 1 ulp
            np.testing.assert_allclose(back[key], value, rtol=0, atol=6e-8, err_msg=key)
        else:
            np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parametrize("variant, name", [("LightningDiT-XL/1", "LightningDiT_XL_1"),
                                           ("LightningDiT-B/1", "LightningDiT_B_1")])
def test_export_matches_upstream_manifest(manifest, variant, name):
    """params_to_torch of a fresh model = upstream state_dict, key for key (shapes, order)."""
    m = manifest(name)
    model = LightningDiT(**lightningdit_kwargs(variant, **RELEASED_FLAGS))
    # The abstract tree: nothing is initialised or allocated, only layouts are checked.
    sd = params_to_torch(abstract_params(model), model)
    expected = [(e["key"], tuple(e["shape"]), e["dtype"]) for e in m["state_dict"]]
    assert [(k, v.shape, str(v.dtype)) for k, v in sd.items()] == expected
    n_params = sum(int(np.prod(v.shape)) for k, v in sd.items() if not k.startswith("feat_rope"))
    assert n_params == m["num_parameters"]


def test_training_checkpoint_formats(golden, tmp_path):
    """.pt with {'model','ema','opt','config'} (ema chosen), module. prefixes, .safetensors."""
    sd, model = _case(golden, MAIN)
    tensors = {k: torch.from_numpy(v.copy()) for k, v in sd.items()}
    ema = {k: v + 1.0 for k, v in tensors.items() if k != "pos_embed" and "rope" not in k}
    ema.update({k: tensors[k] for k in tensors if k == "pos_embed" or "rope" in k})
    ckpt = tmp_path / "0080000.pt"
    torch.save({"model": {"module." + k: v for k, v in tensors.items()}, "ema": ema,
                "opt": {"state": {}}, "config": {"lr": 2e-4}}, ckpt)
    got_ema = params_from_torch(ckpt, model)
    got_model = params_from_torch(ckpt, model, select=("model",))
    ref = params_from_torch(sd, model)
    np.testing.assert_array_equal(got_model["x_embedder"]["bias"], ref["x_embedder"]["bias"])
    np.testing.assert_array_equal(got_ema["x_embedder"]["bias"], ref["x_embedder"]["bias"] + 1)

    st = tmp_path / "model.safetensors"
    save_state_dict(st, sd)
    np.testing.assert_array_equal(params_from_torch(st, model)["final_layer"]["linear"]["kernel"],
                                  ref["final_layer"]["linear"]["kernel"])


def test_upstream_ema_pos_embed_drift_loads(golden):
    """upstream train.py's update_ema averages the frozen pos_embed too: float32 rounding moves
    the EMA's copy by ~1e-4 within a few thousand steps; that EMA must still load."""
    sd, model = _case(golden, MAIN)
    pos = torch.from_numpy(sd["pos_embed"].copy())
    ema = pos.clone()
    for _ in range(3000):
        ema.mul_(0.9999).add_(pos, alpha=1 - 0.9999)  # update_ema with an unchanged parameter
    drift = float((ema - pos).abs().max())
    assert drift > 1e-5  # what the 1e-5 tolerance of the other constants refused
    params = params_from_torch({**sd, "pos_embed": ema.numpy()}, model)
    np.testing.assert_array_equal(params["x_embedder"]["bias"], sd["x_embedder.proj.bias"])
    # the exported file carries the exact table, as upstream's `model` entry does
    np.testing.assert_array_equal(params_to_torch(params, model)["pos_embed"], sd["pos_embed"])


def test_save_torch_checkpoint_loads_back(golden, tmp_path):
    sd, model = _case(golden, MAIN)
    params = params_from_torch(sd, model)
    path = tmp_path / "export.pt"
    save_torch_checkpoint(path, params, model)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "ema"}
    assert list(raw["ema"]) == list(sd)
    np.testing.assert_array_equal(raw["ema"]["blocks.1.mlp.w12.weight"].numpy(),
                                  sd["blocks.1.mlp.w12.weight"])


def test_bfloat16_params_export_and_load_back(golden, tmp_path):
    sd, model = _case(golden, MAIN)
    bf16 = model.clone(param_dtype=jax.numpy.bfloat16)
    params = params_from_torch(sd, bf16)
    save_torch_checkpoint(tmp_path / "bf16.pt", params, bf16)
    assert torch.load(tmp_path / "bf16.pt", weights_only=True)["ema"][
        "blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    back = params_from_torch(tmp_path / "bf16.pt", bf16)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        assert b.dtype == a.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_errors_list_every_bad_key(golden):
    sd, model = _case(golden, MAIN)
    bad = dict(sd)
    del bad["blocks.0.attn.proj.bias"]
    bad["blocks.0.attn.qkv.weight"] = np.zeros((191, 64), np.float32)
    bad["blocks.7.unknown.weight"] = np.zeros(3, np.float32)
    bad["pos_embed"] = sd["pos_embed"] + 0.5
    with pytest.raises(ConversionError) as e:
        params_from_torch(bad, model)
    msg = str(e.value)
    assert "missing keys (1)" in msg and "blocks.0.attn.proj.bias" in msg
    assert "unexpected keys (1)" in msg and "blocks.7.unknown.weight" in msg
    assert "blocks.0.attn.qkv.weight: got (191, 64), expected (192, 64)" in msg
    assert "pos_embed: max |diff| 0.5" in msg


def test_wrong_architecture_is_reported(golden):
    """Loading with the wrong flags names what differs instead of failing deep inside."""
    sd, model = _case(golden, MAIN)
    with pytest.raises(ConversionError, match=r"(?s)missing keys.*mlp\.fc1\.weight.*unexpected "
                                              r"keys.*mlp\.w12\.weight"):
        params_from_torch(sd, model.clone(use_swiglu=False))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        params_from_torch("nope.pt", model)
