"""LightningDiT forward parity with upstream (golden vectors) and model properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import assert_close, nhwc

from dit_jax import RELEASED_FLAGS, VARIANTS, LightningDiT, count_params, lightningdit_kwargs
from dit_jax.convert import abstract_params, params_from_torch

DIT_CASES = [
    "dit_p1_qknorm0",
    "dit_p1_qknorm1",
    "dit_p1_woshift_qknorm1",
    "dit_p2_plain_qknorm1_learnsigma",
    "dit_p2_qknorm0",
    "dit_p2_qknorm1",
]
CFG_CASES = ["cfg_interval_active", "cfg_interval_skipped", "cfg_no_interval"]


@functools.cache
def _model_and_params(golden, case):
    g = golden(case)
    cfg = g.meta["config"]
    return g, LightningDiT(**cfg), params_from_torch(g.params, LightningDiT(**cfg))


@pytest.mark.parametrize("case", DIT_CASES)
def test_forward_matches_upstream(golden, case):
    g, model, params = _model_and_params(golden, case)
    apply = jax.jit(functools.partial(model.apply, capture_intermediates=True))
    out, state = apply({"params": params}, nhwc(g["x"]), g["t"], g["y"])
    assert_close(out, nhwc(g["out"]), name=f"{case}.out")

    # Hooked upstream intermediates (present for the main and patch-2 cases).
    inter = jax.tree.map(lambda v: v[0], state["intermediates"],
                         is_leaf=lambda v: isinstance(v, tuple))
    ours = {
        "x_embedder_out": inter["x_embedder"]["__call__"],
        "t_embedder_out": inter["t_embedder"]["__call__"],
        "y_embedder_out": inter["y_embedder"]["__call__"],
        "blocks.0.attn_out": inter["blocks_0"]["attn"]["__call__"],
        "blocks.0.mlp_out": inter["blocks_0"]["mlp"]["__call__"],
        "final_layer_out": inter["final_layer"]["__call__"],
    }
    for i in range(g.meta["config"]["depth"]):
        ours[f"blocks.{i}.out"] = inter[f"blocks_{i}"]["__call__"]
    for key, want in g.group("inter").items():
        assert_close(ours[key], want, name=f"{case}.inter.{key}")


@pytest.mark.parametrize("case", DIT_CASES)
def test_forward_with_cfg_matches_upstream(golden, case):
    """Upstream's doubled-batch CFG, guiding channels 0..2 only (cfg_channels=3)."""
    g, model, params = _model_and_params(golden, case)
    x, y = nhwc(g["cfg.x"]), g["cfg.y"]
    raw = jax.jit(model.apply)({"params": params}, x, g["cfg_interval_active.t"], y)
    assert_close(raw, nhwc(g["cfg.raw_model_out"]), name=f"{case}.cfg.raw_model_out")

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def with_cfg(t, scale, start, channels):
        return model.apply({"params": params}, x, t, y, scale, start, channels,
                           method=LightningDiT.forward_with_cfg)

    for sub in CFG_CASES:
        spec = g.meta["forward_with_cfg"][sub]
        start = spec["cfg_interval_start"] if spec["cfg_interval"] else 0.0
        out = with_cfg(g[f"{sub}.t"], spec["cfg_scale"], start, 3)
        assert_close(out, nhwc(g[f"{sub}.out"]), name=f"{case}.{sub}")


@functools.cache
def _tiny():
    model = LightningDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                         num_heads=2, num_classes=10, use_swiglu=True, use_rope=True,
                         use_rmsnorm=True)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 4))
    t = jnp.array([0.0, 0.3, 0.6, 1.0])
    y = jnp.array([0, 3, 9, 10])
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x, t, y)["params"])
    return model, params, x, t, y


def test_output_is_zero_at_init():
    model, params, x, t, y = _tiny()
    np.testing.assert_array_equal(jax.jit(model.apply)({"params": params}, x, t, y), 0.0)


def test_upstream_initialisation():
    """SPEC 2.11: xavier linears, N(0, 0.02) embeddings, zero adaLN / final layer, unit norms."""
    d = 512  # wide enough for tight statistics, 2 blocks to stay fast
    model = LightningDiT(input_size=16, patch_size=2, in_channels=32, hidden_size=d, depth=2,
                         num_heads=8, **{k: v for k, v in RELEASED_FLAGS.items()
                                         if k.startswith(("use_", "wo_"))})
    x = jnp.zeros((1, 16, 16, 32))
    init = jax.jit(model.init)
    params = nn.meta.unbox(init(jax.random.key(0), x, jnp.zeros(1), jnp.zeros(1, int))["params"])
    b0 = params["blocks_0"]
    qkv = np.asarray(b0["attn"]["qkv"]["kernel"]).reshape(d, -1)
    bound = np.sqrt(6 / (d + 3 * d))
    assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.95 * bound
    np.testing.assert_allclose(np.std(params["y_embedder"]["embedding_table"]), 0.02, rtol=0.05)
    np.testing.assert_allclose(np.std(params["t_embedder"]["mlp_0"]["kernel"]), 0.02, rtol=0.05)
    for leaf in jax.tree.leaves(b0["adaLN_modulation"]) + jax.tree.leaves(params["final_layer"]
                                                                          ["linear"]):
        np.testing.assert_array_equal(leaf, 0.0)
    np.testing.assert_array_equal(b0["norm1"]["scale"], 1.0)
    patch = np.asarray(params["x_embedder"]["kernel"]).reshape(-1, d)  # (C p p, D)
    assert np.abs(patch).max() <= np.sqrt(6 / (32 * 4 + d))


@pytest.mark.parametrize(
    "variant, expected",
    [("LightningDiT-XL/1", 675_256_736), ("LightningDiT-B/1", 130_556_192)],
)
def test_parameter_count_matches_upstream(variant, expected):
    """Upstream counts include the frozen pos_embed (a constant here)."""
    kwargs = lightningdit_kwargs(variant, **RELEASED_FLAGS)
    model = LightningDiT(**kwargs)
    pos_embed = (16 // kwargs["patch_size"]) ** 2 * kwargs["hidden_size"]
    assert count_params(abstract_params(model)) + pos_embed == expected


def test_all_size_variants_build():
    assert {n.split("-")[1].split("/")[0] for n in VARIANTS} >= {"S", "B", "L", "XL"}
    assert {int(n[-1]) for n in VARIANTS} == {1, 2, 4}
    for name in VARIANTS:
        model = LightningDiT(**lightningdit_kwargs(name, input_size=16, in_channels=32))
        assert count_params(abstract_params(model)) > 0


def test_label_dropout():
    model, params, x, t, _ = _tiny()
    y = jnp.zeros((4096,), jnp.int32)
    embed = lambda **kw: model.apply({"params": params}, y, method=lambda m, y, **k: m.y_embedder(
        y, **k), **kw)
    table = np.asarray(params["y_embedder"]["embedding_table"])
    dropped = embed(train=True, rngs={"label_dropout": jax.random.key(3)})
    is_null = np.all(np.isclose(np.asarray(dropped), table[10]), axis=-1)
    assert 0.08 < is_null.mean() < 0.12  # class_dropout_prob 0.1
    np.testing.assert_array_equal(embed(train=False), np.broadcast_to(table[0], (4096, 32)))
    forced = embed(force_drop_ids=jnp.ones_like(y))
    np.testing.assert_array_equal(forced, np.broadcast_to(table[10], (4096, 32)))


@jax.jit
def _perturbed(params, seed=7):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])


def test_remat_and_bf16():
    """Remat changes nothing numerically; bf16 compute stays close to float32."""
    model, params, x, t, y = _tiny()
    params = _perturbed(params)

    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, x, t, y) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    ref, ref_grad = value_and_grad(model, params)
    val, grad = value_and_grad(model.clone(remat=True), params)
    np.testing.assert_allclose(val, ref, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grad, ref_grad)

    out32 = jax.jit(model.apply)({"params": params}, x, t, y)
    out16 = jax.jit(model.clone(dtype=jnp.bfloat16).apply)({"params": params}, x, t, y)
    assert out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 2e-2, rel


def test_wrong_input_shape_is_reported():
    model, params, x, t, y = _tiny()
    with pytest.raises(ValueError, match=r"expects inputs \(B, 8, 8, 4\) NHWC, got \(4, 4, 8, 8\)"):
        model.apply({"params": params}, x.transpose(0, 3, 1, 2), t, y)
