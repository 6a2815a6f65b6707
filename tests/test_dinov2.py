"""DINOv2 feature extractor (vavae_jax.dinov2) and its converters against the upstream goldens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import assert_close

from torchport import ConversionError
from vavae_jax.dinov2 import (
    antialias_bicubic_matrix,
    bicubic_matrix,
    bilinear_matrix,
    dinov2_model,
    foundation_features,
    preprocess,
    resample_pos_embed,
)
from vavae_jax.dinov2_convert import (
    abstract_params,
    detect_layout,
    params_from_torch,
    params_to_torch,
)

TOL = dict(atol=1e-4, rtol=1e-4)
TINY = dict(embed_dim=32, depth=2, num_heads=2)  # the goldens' timm vit_large_patch14_dinov2 args

HF_LEGACY_RENAMES = (  # transformers 5.x module names -> 4.x / HF-hub file names
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
)


def _to_legacy(key: str) -> str:
    for new, old in HF_LEGACY_RENAMES:
        key = key.replace(new, old)
    return key


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _images(g) -> np.ndarray:
    """image_uint8 preprocessed as upstream (ToTensor + Normalize(0.5, 0.5)), NHWC."""
    return ((g["image_uint8"].astype(np.float32) / 255.0) - 0.5) / 0.5


@pytest.fixture(scope="module")
def timm_case(golden):
    g = golden("dinov2_timm_tiny")
    model = dinov2_model("L", **TINY)
    params = params_from_torch(g.params, model)
    return g, model, params


@pytest.fixture(scope="module")
def features_fn(timm_case):
    """One jitted feature function shared by the tests (latent grid is static)."""
    _, model, _ = timm_case
    return jax.jit(
        lambda params, x, grid: foundation_features(model, params, x, grid), static_argnums=2
    )


# ----------------------------------------------------------------------------------------------
# Resampling matrices vs PyTorch


def test_resize_matrices_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(0)

    def torch_resize(x, size, **kw):
        return F.interpolate(torch.from_numpy(x), size=size, align_corners=False, **kw).numpy()

    def ours(x, rows, cols):
        return np.einsum("ih,jw,nchw->ncij", rows, cols, x, optimize=True)

    for n_in, n_out in [(256, 224), (512, 448), (112, 224), (100, 70)]:
        x = rng.uniform(-1, 1, (1, 3, n_in, n_in)).astype(np.float32)
        want = torch_resize(x, (n_out, n_out), mode="bilinear")
        m = bilinear_matrix(n_in, n_out)
        assert _max_err(ours(x, m, m), want) < 3e-7, (n_in, n_out)

    # Values ~N(0, 1): differences are float32 rounding of the separable passes.
    for g_in, (gh, gw) in [(37, (16, 16)), (37, (8, 8)), (37, (32, 24)), (16, (37, 37))]:
        x = rng.standard_normal((1, 4, g_in, g_in)).astype(np.float32)
        want = torch_resize(x, (gh, gw), mode="bicubic", antialias=True)
        got = ours(x, antialias_bicubic_matrix(g_in, gh), antialias_bicubic_matrix(g_in, gw))
        assert _max_err(got, want) < 1e-5, (g_in, gh, gw)
        want = torch_resize(x, (gh, gw), mode="bicubic", antialias=False)
        assert _max_err(ours(x, bicubic_matrix(g_in, gh), bicubic_matrix(g_in, gw)), want) < 2e-5


# ----------------------------------------------------------------------------------------------
# Goldens


def test_timm_golden(timm_case, features_fn):
    """Upstream forward_dinov2 on a tiny timm DINOv2 (37x37 pos_embed, 256 -> 224 input)."""
    g, model, params = timm_case
    x = jnp.asarray(_images(g))

    x224 = preprocess(x, (224, 224))
    crop = np.asarray(x224).transpose(0, 3, 1, 2)[:, :, :64, :64]
    assert_close(crop, g["x224_crop64"], name="dinov2_timm_tiny.x224_crop64", **TOL)

    pos = resample_pos_embed(params["pos_embed"], (16, 16))
    assert_close(pos, g["pos_embed_resampled_16x16"], atol=1e-6, rtol=1e-6,
                 name="dinov2_timm_tiny.pos_embed_resampled_16x16")

    tokens = jax.jit(lambda p, v: model.apply({"params": p}, v))(params, x224)
    assert_close(tokens, g["forward_features_224"], name="dinov2_timm_tiny.forward_features_224",
                 **TOL)

    feats = features_fn(params, x, 16)  # (B, 16, 16, C)
    assert feats.shape == (2, 16, 16, 32)
    nchw = np.asarray(feats).transpose(0, 3, 1, 2)
    assert_close(nchw, g["aux_features"], name="dinov2_timm_tiny.aux_features", **TOL)


def test_hf_golden(golden, timm_case):
    """transformers Dinov2Model (bicubic pos interpolation without antialias) from HF names."""
    h = golden("dinov2_hf_tiny")
    _, _, timm_params = timm_case
    assert detect_layout(h.params) == "hf"
    model = dinov2_model("L", **TINY, pos_interpolation="bicubic")
    params = params_from_torch(h.params, model)
    # Same weights as the timm golden (mask_token is ignored).
    jax.tree.map(np.testing.assert_array_equal, params, timm_params)

    for grid in (8, 16):
        name = f"pos_embed_interpolated_{grid}x{grid}"
        pos = resample_pos_embed(params["pos_embed"], (grid, grid), "bicubic")
        assert_close(pos, h[name], atol=1e-6, rtol=1e-6, name=f"dinov2_hf_tiny.{name}")

    x112 = jnp.asarray(h["x112"].transpose(0, 2, 3, 1))
    hidden = jax.jit(lambda p, v: model.apply({"params": p}, v))(params, x112)
    assert_close(hidden, h["last_hidden_state_112"],
                 name="dinov2_hf_tiny.last_hidden_state_112", **TOL)


def test_input_512_gives_32x32_grid(timm_case, features_fn):
    g, _, params = timm_case
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(-1, 1, (1, 512, 512, 3)).astype(np.float32))
    feats = features_fn(params, x, 32)  # 512 -> 448 = 14 x 32
    assert feats.shape == (1, 32, 32, 32)
    assert bool(jnp.all(jnp.isfinite(feats)))
    # A constant target: no gradient reaches the input (upstream runs it under no_grad).
    grad = jax.grad(lambda v: features_fn(params, v, 32).sum())(x)
    assert not np.any(np.asarray(grad))


def test_imagenet_norm_option():
    x = jnp.linspace(-1.0, 1.0, 2 * 28 * 28 * 3).reshape(2, 28, 28, 3)
    plain = preprocess(x, (14, 14))
    normed = preprocess(x, (14, 14), imagenet_norm=True)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    np.testing.assert_allclose(normed, ((np.asarray(plain) + 1) / 2 - mean) / std, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Converters


def test_timm_round_trip(timm_case):
    g, model, params = timm_case
    back = params_to_torch(params, model, layout="timm")
    assert list(back) == list(g.params)
    for key, value in g.params.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_hf_round_trips(golden, timm_case):
    h = golden("dinov2_hf_tiny")
    _, model, params = timm_case
    back = params_to_torch(params, model, layout="hf")
    assert list(back) == list(h.params)  # incl. the zero embeddings.mask_token
    for key, value in h.params.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)

    # transformers 4.x / HF-hub names.
    legacy = {_to_legacy(k): v for k, v in h.params.items()}
    assert detect_layout(legacy) == "hf_legacy"
    loaded = params_from_torch(legacy, model)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    back = params_to_torch(params, model, layout="hf_legacy")
    assert list(back) == list(legacy)
    for key, value in legacy.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_torch_hub_and_vavae_checkpoint_names(timm_case):
    g, model, params = timm_case
    hub = {"mask_token": np.full((1, 32), 0.3, np.float32), **g.params}  # official .pth keys
    assert detect_layout(hub) == "torch_hub"
    jax.tree.map(np.testing.assert_array_equal, params_from_torch(hub, model), params)

    exported = params_to_torch(params, model, layout="torch_hub")
    assert list(exported) == ["cls_token", "pos_embed", "mask_token"] + list(g.params)[2:]
    assert not np.any(exported["mask_token"])

    # A VA-VAE training checkpoint: Lightning `state_dict` with the frozen DINOv2 inside.
    ckpt = {
        "state_dict": {
            "encoder.conv_in.weight": np.zeros((8, 3, 3, 3), np.float32),
            **{f"foundation_model.model.{k}": v for k, v in g.params.items()},
        },
        "global_step": 7,
    }
    jax.tree.map(np.testing.assert_array_equal, params_from_torch(ckpt, model), params)


def test_bad_keys_raise(timm_case):
    g, model, _ = timm_case
    bad = dict(g.params)
    del bad["blocks.1.ls2.gamma"]
    bad["blocks.0.attn.qkv.weight"] = bad["blocks.0.attn.qkv.weight"][:64]
    bad["head.weight"] = np.zeros((10, 32), np.float32)
    with pytest.raises(ConversionError) as err:
        params_from_torch(bad, model)
    msg = str(err.value)
    assert "blocks.1.ls2.gamma" in msg and "head.weight" in msg
    assert "blocks.0.attn.qkv.weight: got (64, 32), expected (96, 32)" in msg

    with pytest.raises(ConversionError, match="unexpected keys"):  # depth mismatch
        params_from_torch(g.params, dinov2_model("L", embed_dim=32, depth=1, num_heads=2))


def test_registers_timm_and_hub_layouts():
    """Register tokens: official names, and timm's folded layout (as timm's _convert_dinov2)."""
    model = dinov2_model("S", **TINY, num_register_tokens=2, pos_grid=4)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 42, 28, 3)), jnp.float32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x)["params"])
    params["pos_embed"] = params["pos_embed"] + 0.5  # make the CLS slot matter

    hub = params_to_torch(params, model, layout="torch_hub")
    assert hub["register_tokens"].shape == (1, 2, 32) and hub["pos_embed"].shape == (1, 17, 32)
    timm_sd = {k: v for k, v in hub.items() if k not in ("mask_token", "register_tokens")}
    timm_sd["reg_token"] = hub["register_tokens"]
    timm_sd["cls_token"] = hub["cls_token"] + hub["pos_embed"][:, :1]
    timm_sd["pos_embed"] = hub["pos_embed"][:, 1:]
    exported = params_to_torch(params, model, layout="timm")
    assert sorted(exported) == sorted(timm_sd)
    for key, value in timm_sd.items():
        np.testing.assert_allclose(exported[key], value, atol=0, rtol=0, err_msg=key)

    apply = jax.jit(lambda p: model.apply({"params": p}, x))
    want = apply(params)  # (1, 1 + 2 + 3*2, D)
    assert want.shape == (1, 9, 32)
    np.testing.assert_allclose(apply(params_from_torch(hub, model)), want, atol=1e-6)
    np.testing.assert_allclose(apply(params_from_torch(timm_sd, model)), want, atol=1e-6)


def test_vit_l_manifest(manifest):
    """Abstract ViT-L/14 export = the timm state dict of vit_large_patch14_dinov2, key for key."""
    m = manifest("DINOv2_ViT_L14_timm")
    model = dinov2_model("L")
    abstract = abstract_params(model)
    shapes = params_to_torch(abstract, model, layout="timm")
    assert [(k, list(v.shape)) for k, v in shapes.items()] == [
        (e["key"], e["shape"]) for e in m["state_dict"]
    ]
    total = sum(int(np.prod(v.shape)) for v in shapes.values())
    assert total == m["num_parameters"] == 304_367_616

    hub = params_to_torch(abstract, model, layout="torch_hub")  # + mask_token (1, 1024)
    assert set(hub) - set(shapes) == {"mask_token"} and hub["mask_token"].shape == (1, 1024)


def test_vit_g_swiglu_layout():
    """ViT-g/14: SwiGLU FFN w12 (2 x 4096, 1536) / w3 (1536, 4096) as the official dinov2_vitg14."""
    model = dinov2_model("g")
    abstract = abstract_params(model)
    hub = params_to_torch(abstract, model, layout="torch_hub")
    assert hub["blocks.39.mlp.w12.weight"].shape == (8192, 1536)
    assert hub["blocks.39.mlp.w3.weight"].shape == (1536, 4096)
    # Parameter count of the official ViT-g/14 module (incl. mask_token).
    assert sum(int(np.prod(v.shape)) for v in hub.values()) == 1_136_480_768
    assert "blocks.0.mlp.fc1.weight" in params_to_torch(abstract, model, layout="timm")
    assert "encoder.layer.0.mlp.weights_in.weight" in params_to_torch(abstract, model,
                                                                      layout="hf")


def test_bfloat16_compute_and_sharding(timm_case, features_fn):
    """bf16 compute stays close to float32; logical axes shard on the project's mesh."""
    from launch.sharding import DEFAULT_RULES, create_mesh, logical_shardings

    g, model, params = timm_case
    x = jnp.asarray(_images(g))
    want = features_fn(params, x, 16)

    bf16 = model.clone(dtype=jnp.bfloat16)
    got = jax.jit(lambda p, v: foundation_features(bf16, p, v, 16))(params, x)
    assert got.dtype == jnp.bfloat16
    assert _max_err(got.astype(jnp.float32), want) < 0.1  # features are O(3)

    abstract = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(x.shape, x.dtype))
    known = {name for name, _ in DEFAULT_RULES}
    for spec in jax.tree.leaves(nn.get_partition_spec(abstract["params"])):
        assert set(spec) - {None} <= known, spec
    if len(jax.devices()) >= 8:
        shardings = logical_shardings(abstract["params"], create_mesh((2, 2, 2)))
        sharded = jax.device_put(params, shardings)
        np.testing.assert_allclose(features_fn(sharded, x, 16), want, atol=1e-5)
