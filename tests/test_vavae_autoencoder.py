"""VA-VAE autoencoder (vavae_jax.autoencoder) and its state-dict converter (vavae_jax.convert).

Numerics are checked against `vavae_tiny.npz`: the upstream PyTorch model with the f16d32 ddconfig
except ch=32, ch_mult=(1, 1, 1, 1, 2), run on a 2x3x64x64 image. Golden arrays are NCHW; the port
is NHWC, so goldens are transposed before comparing. Layout/naming is checked against the f16d32
inference manifest. Jitted functions are built once per module (compiles dominate the run time).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from helpers import assert_close
from jax.sharding import PartitionSpec

from torchport import ConversionError, conv_to_flax
from vavae_jax.autoencoder import AutoencoderKL, Encoder, decode_to_uint8
from vavae_jax.blocks import MidBlock, conv, group_norm
from vavae_jax.convert import abstract_params, params_from_torch, params_to_torch, torch_rules
from vavae_jax.distributions import DiagonalGaussian

ATOL = RTOL = 1e-4


def nhwc(a):
    a = np.asarray(a)
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


# ----------------------------------------------------------------------------------------------
# Fixtures: the tiny golden model, loaded once


@pytest.fixture(scope="module")
def tiny(golden):
    g = golden("vavae_tiny")
    state_dict = {
        **golden("vavae_tiny_params_encoder").params,
        **golden("vavae_tiny_params_decoder").params,
    }
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in g.meta["ddconfig"].items()}
    model = AutoencoderKL(embed_dim=g.meta["embed_dim"], **cfg)
    params = params_from_torch(state_dict, model=model)
    return types.SimpleNamespace(g=g, state_dict=state_dict, model=model, params=params)


def _golden_forward(model):
    """Everything vavae_tiny.npz records, from one jitted forward pass (`__call__` decodes the
    posterior mean when sample_posterior=False)."""

    def run(params, x, eps):
        (decoded, posterior), state = model.apply(
            {"params": params},
            x,
            sample_posterior=False,
            capture_intermediates=lambda mdl, _: isinstance(mdl, Encoder),
            mutable=["intermediates"],
        )
        return {
            "encoder_out_moments_pre_quant_conv": state["intermediates"]["encoder"]["__call__"][0],
            "posterior_mean": posterior.mean,
            "posterior_logvar": posterior.logvar,
            "posterior_std": posterior.std,
            "kl": posterior.kl(),
            "z_sample": posterior.sample_with_eps(eps),
            "decoded_from_mean": decoded,
        }

    return jax.jit(run)


@pytest.fixture(scope="module")
def tiny_outputs(tiny):
    out = _golden_forward(tiny.model)(tiny.params, nhwc(tiny.g["x"]), nhwc(tiny.g["sample_eps"]))
    return jax.tree.map(np.asarray, out)


# ----------------------------------------------------------------------------------------------
# Golden numerics


GOLDEN_ARRAYS = [
    "encoder_out_moments_pre_quant_conv",
    "posterior_mean",
    "posterior_logvar",
    "posterior_std",
    "kl",
    "z_sample",
    "decoded_from_mean",
]


@pytest.mark.parametrize("name", GOLDEN_ARRAYS)
def test_matches_golden(tiny, tiny_outputs, name):
    want, got = nhwc(tiny.g[name]), tiny_outputs[name]
    assert got.shape == want.shape and got.dtype == np.float32
    assert_close(got, want, atol=ATOL, rtol=RTOL, name=f"vavae_tiny.{name}")


def test_decode_to_uint8_formula(tiny):
    # Same float32 arithmetic as upstream on the same input: bit-exact.
    images = np.asarray(decode_to_uint8(nhwc(tiny.g["decoded_from_mean"])))
    assert images.dtype == np.uint8
    np.testing.assert_array_equal(images, tiny.g["decode_to_images_uint8"])


def test_decode_to_uint8_from_port(tiny, tiny_outputs):
    """Truncation turns ~1e-5 float differences into 1-level flips exactly at integer boundaries:
    allow those (on <= 0.1% of the values), nothing else."""
    want = tiny.g["decode_to_images_uint8"].astype(int)
    got = np.asarray(decode_to_uint8(tiny_outputs["decoded_from_mean"])).astype(int)
    diff = np.abs(got - want)
    print(f"decode_to_images_uint8: max|diff| = {diff.max()}, {np.count_nonzero(diff)} values")
    assert diff.max() <= 1
    assert np.count_nonzero(diff) <= 1e-3 * diff.size
    scaled = 127.5 * nhwc(tiny.g["decoded_from_mean"]).astype(np.float64) + 128.0
    assert np.all(np.abs(scaled - np.round(scaled))[diff > 0] < 1e-2)


def test_bf16_compute_close_to_fp32(tiny):
    """bf16 activations/matmuls, float32 params and norm statistics. Errors are relative L2; the
    tiny model has random weights, so these are looser than for a trained model."""
    model = tiny.model.clone(dtype=jnp.bfloat16)

    def run(params, x, z):
        posterior = model.apply({"params": params}, x, method="encode")
        return posterior, model.apply({"params": params}, z, method="decode")

    posterior, decoded = jax.jit(run)(
        tiny.params, nhwc(tiny.g["x"]), nhwc(tiny.g["posterior_mean"])
    )
    assert posterior.mean.dtype == decoded.dtype == jnp.float32

    def rel(a, b):
        return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))

    err_mean = rel(posterior.mean, nhwc(tiny.g["posterior_mean"]))
    err_dec = rel(decoded, nhwc(tiny.g["decoded_from_mean"]))
    print(f"bf16 relative L2 error: posterior mean {err_mean:.3g}, decoded {err_dec:.3g}")
    assert err_mean < 0.08 and err_dec < 0.1


# ----------------------------------------------------------------------------------------------
# Converter


def test_round_trip_torch_flax_torch(tiny):
    back = params_to_torch(tiny.params, model=tiny.model)
    assert set(back) == set(tiny.state_dict)
    for key, value in tiny.state_dict.items():
        assert back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value.astype(np.float32), err_msg=key)
    # ... and flax -> torch -> flax.
    again = params_from_torch(back, model=tiny.model)
    jax.tree.map(np.testing.assert_array_equal, again, tiny.params)


def test_tiny_parameter_tree_naming(tiny):
    flat = traverse_util.flatten_dict(tiny.params, sep="/")
    assert flat["encoder/down_0/block_1/norm1/scale"].shape == (32,)
    assert flat["encoder/down_4/attn_0/q/kernel"].shape == (1, 1, 64, 64)
    assert flat["encoder/down_3/downsample/conv/kernel"].shape == (3, 3, 32, 32)
    assert flat["encoder/mid/attn_1/proj_out/bias"].shape == (64,)
    assert flat["decoder/up_3/block_0/nin_shortcut/kernel"].shape == (1, 1, 64, 32)
    assert flat["decoder/up_4/upsample/conv/kernel"].shape == (3, 3, 64, 64)
    assert flat["quant_conv/kernel"].shape == (1, 1, 64, 64)
    # Attention only at the 16x16 level of resolution=256 (level 4), although the input is 64x64.
    assert not any("/attn_" in k for k in flat if "/down_3/" in k or "/up_3/" in k)


def test_f16d32_layout_matches_manifest(manifest):
    """params_to_torch of an f16d32 init reproduces the upstream inference state dict key for key
    (order and shapes). Shapes come from jax.eval_shape; zero-stride views stand in for values."""
    m = manifest("VAVAE_f16d32_inference")
    model = AutoencoderKL()
    abstract = abstract_params(model)
    views = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), abstract)
    state_dict = params_to_torch(views, model=model)
    assert [e["key"] for e in m["state_dict"]] == list(state_dict)
    for entry in m["state_dict"]:
        assert tuple(entry["shape"]) == state_dict[entry["key"]].shape, entry["key"]
    n_params = sum(int(np.prod(v.shape)) for v in state_dict.values())
    assert n_params == m["num_parameters"] == 69_836_067
    assert len(state_dict) == m["num_state_dict_entries"] == 342


def test_training_manifest_vf_projection(manifest):
    m = manifest("VAVAE_f16d32_vfdinov2_training")
    entry = next(e for e in m["state_dict"] if e["key"] == "linear_proj.weight")
    model = AutoencoderKL(use_vf="dinov2")
    assert abstract_params(model)["linear_proj"]["kernel"].shape == (1, 1, 32, 1024)
    rule = next(r for r in torch_rules(model) if r.torch_key == "linear_proj.weight")
    kernel = np.zeros((1, 1, 32, 1024), np.float32)
    assert rule.to_torch_fn(kernel).shape == tuple(entry["shape"]) == (1024, 32, 1, 1)


def _training_extras(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A few entries of each kind the training module adds (SPEC 5.8), at small sizes."""
    return {
        "foundation_model.model.cls_token": rng.standard_normal((1, 1, 8), np.float32),
        "foundation_model.model.blocks.0.attn.qkv.weight": rng.standard_normal((24, 8), np.float32),
        "loss.logvar": np.zeros((), np.float32),
        "loss.discriminator.main.0.weight": rng.standard_normal((8, 3, 4, 4), np.float32),
        "loss.perceptual_loss.lin0.model.1.weight": rng.standard_normal((1, 8, 1, 1), np.float32),
        "linear_proj.weight": rng.standard_normal((1024, 32, 1, 1), np.float32),
    }


def test_training_checkpoint_file_loads(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    extras = _training_extras(np.random.default_rng(0))
    state_dict = {**tiny.state_dict, **extras}
    checkpoint = {
        "state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()},
        "epoch": 3,
        "global_step": 1234,
    }
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)

    # Inference model: extras (and linear_proj) skipped.
    params = params_from_torch(path, model=tiny.model)
    assert "linear_proj" not in params
    jax.tree.map(np.testing.assert_array_equal, params, tiny.params)

    # Training model with the VF projection: linear_proj kept and usable.
    vf_model = tiny.model.clone(use_vf="dinov2")
    vf_params = params_from_torch(path, model=vf_model)
    kernel = vf_params["linear_proj"]["kernel"]
    np.testing.assert_array_equal(kernel, conv_to_flax(extras["linear_proj.weight"]))
    z = np.random.default_rng(1).standard_normal((1, 2, 2, 32)).astype(np.float32)
    projected = vf_model.apply({"params": vf_params}, z, method="project_vf")
    assert projected.shape == (1, 2, 2, 1024)
    np.testing.assert_allclose(projected, z @ kernel[0, 0], atol=1e-4, rtol=1e-4)

    # On request for a model without use_vf; and a round trip writes it back.
    kept = params_from_torch(path, model=tiny.model, keep_vf_proj=True)
    back = params_to_torch(kept, model=tiny.model)
    np.testing.assert_array_equal(back["linear_proj.weight"], extras["linear_proj.weight"])


def test_released_layout_unwrapped_with_extras(tiny):
    extras = _training_extras(np.random.default_rng(2))
    params = params_from_torch({**tiny.state_dict, **extras}, model=tiny.model)
    jax.tree.map(np.testing.assert_array_equal, params, tiny.params)


def test_vf_projection_required_when_model_has_use_vf(tiny):
    with pytest.raises(ConversionError, match="linear_proj.weight"):
        params_from_torch(tiny.state_dict, model=tiny.model.clone(use_vf="dinov2"))
    with pytest.raises(ConversionError, match="linear_proj.weight"):
        params_from_torch(tiny.state_dict, model=tiny.model, keep_vf_proj=True)


def test_bad_keys_raise_and_are_named(tiny):
    bad = dict(tiny.state_dict)
    bad["encoder.conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)  # mis-shaped
    bad["encoder.mid.attn_2.q.weight"] = np.zeros((64, 64, 1, 1), np.float32)  # unknown
    bad["model_ema.decay"] = np.zeros((), np.float32)  # unknown (not a known training extra)
    del bad["decoder.conv_out.bias"]  # missing
    with pytest.raises(ConversionError) as info:
        params_from_torch(bad, model=tiny.model)
    message = str(info.value)
    for key in (
        "encoder.conv_in.weight",
        "encoder.mid.attn_2.q.weight",
        "model_ema.decay",
        "decoder.conv_out.bias",
    ):
        assert key in message, message
    assert "(32, 3, 5, 5)" in message and "(32, 3, 3, 3)" in message


# ----------------------------------------------------------------------------------------------
# Other configurations, init, sharding annotations, remat, sampling

# 3 levels at resolution 16: attention at 16 and 8 (levels 0, 1), not at 4; z_channels != embed_dim.
SMALL = dict(
    embed_dim=4,
    z_channels=8,
    ch=32,
    ch_mult=(1, 2, 2),
    num_res_blocks=1,
    attn_resolutions=(16, 8),
    resolution=16,
)
# Smallest model that still has every kind of module, for tests that compile forward/backward.
MICRO = dict(
    embed_dim=4,
    z_channels=4,
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    resolution=8,
)


def _random_params(model, seed: int = 0) -> dict:
    """Random parameters of init's scale, drawn with numpy: compiling `model.init` costs ~0.2 s
    of XLA time per parameter on CPU (one threefry kernel each), too slow for unit tests."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if path[-1].key == "kernel":
            fan_in = np.prod(s.shape[:-1])
            return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)
        base = 1.0 if path[-1].key == "scale" else 0.0
        return (base + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(model))


def test_other_config_rules_follow_upstream_layout():
    model = AutoencoderKL(**SMALL)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract_params(model)
    )
    state_dict = params_to_torch(params, model=model)
    for key in (
        "encoder.down.0.attn.0.q.weight",
        "encoder.down.1.attn.0.q.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "decoder.up.0.attn.1.k.weight",
        "decoder.up.1.attn.1.v.bias",
        "decoder.up.0.block.0.nin_shortcut.weight",
        "decoder.up.1.upsample.conv.weight",
    ):
        assert key in state_dict, key
    assert not any(k.startswith(("encoder.down.2.attn", "decoder.up.2.attn")) for k in state_dict)
    assert "encoder.down.2.downsample.conv.weight" not in state_dict
    assert "decoder.up.0.upsample.conv.weight" not in state_dict
    assert state_dict["quant_conv.weight"].shape == (8, 16, 1, 1)
    assert state_dict["post_quant_conv.weight"].shape == (8, 4, 1, 1)
    assert state_dict["decoder.up.2.block.1.conv1.weight"].shape == (64, 64, 3, 3)
    again = params_from_torch(state_dict, model=model)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_parameters_carry_logical_axis_names():
    model = AutoencoderKL(**SMALL)
    boxed = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), sample_posterior=False)
    )
    specs = traverse_util.flatten_dict(nn.get_partition_spec(boxed)["params"], sep="/")
    shapes = traverse_util.flatten_dict(nn.unbox(boxed)["params"], sep="/")
    assert set(specs) == set(shapes)
    for path, spec in specs.items():
        assert isinstance(spec, PartitionSpec) and len(spec) == len(shapes[path].shape), path
    assert specs["encoder/conv_in/kernel"] == PartitionSpec(None, None, "conv_in", "conv_out")
    assert specs["encoder/conv_in/bias"] == PartitionSpec("conv_out")
    assert specs["decoder/mid/attn_1/norm/scale"] == PartitionSpec("norm")


def test_conv_init_is_torch_like():
    # PyTorch Conv2d default: kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    layer = conv(64, 3, 32, name="conv1")
    params = nn.unbox(layer.init(jax.random.key(0), jnp.zeros((1, 4, 4, 32))))["params"]
    bound = (9 * 32) ** -0.5
    assert params["kernel"].shape == (3, 3, 32, 64) and params["kernel"].dtype == jnp.float32
    for leaf in (params["kernel"], params["bias"]):
        assert bound * 0.9 < np.abs(leaf).max() <= bound
    norm = group_norm(name="norm", dtype=jnp.float32, param_dtype=jnp.float32)
    norm_params = norm.init(jax.random.key(0), jnp.zeros((1, 2, 2, 64)))["params"]
    np.testing.assert_array_equal(nn.unbox(norm_params)["scale"], 1.0)


def test_remat_same_params_and_gradients():
    # Same parameter tree for the whole model; same values and gradients through a MidBlock
    # (two rematerialised ResnetBlocks around an AttnBlock).
    plain, remat = AutoencoderKL(**MICRO), AutoencoderKL(**MICRO, remat=True)
    assert jax.tree.structure(abstract_params(plain)) == jax.tree.structure(abstract_params(remat))

    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 64))
    params = _random_params(plain)["encoder"]["mid"]

    def value_and_grad(block):
        loss = lambda p: jnp.sum(jnp.square(block.apply({"params": p}, x)))
        return jax.jit(jax.value_and_grad(loss))(params)

    (l0, g0), (l1, g1) = value_and_grad(MidBlock()), value_and_grad(MidBlock(remat=True))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), g0, g1)


def test_call_samples_with_given_rng():
    model = AutoencoderKL(**MICRO)
    variables = {"params": _random_params(model)}
    x = jax.random.normal(jax.random.key(1), (1, 8, 8, 3))

    @jax.jit
    def run(variables, x, rng):
        recon, posterior = model.apply(variables, x, rng)
        expected = model.apply(variables, posterior.sample(rng), method="decode")
        # rng=None draws the noise from the 'sample' RNG stream instead.
        from_stream = model.apply(variables, x, rngs={"sample": rng})[0]
        return recon, posterior, expected, from_stream

    recon, posterior, expected, from_stream = run(variables, x, jax.random.key(7))
    assert recon.shape == from_stream.shape == x.shape and posterior.mean.shape == (1, 4, 4, 4)
    np.testing.assert_allclose(recon, expected, atol=1e-5)
    assert np.all(np.isfinite(from_stream))
    with pytest.raises(ValueError, match="use_vf"):
        model.apply(variables, posterior.mean, method="project_vf")


# ----------------------------------------------------------------------------------------------
# DiagonalGaussian


def test_diagonal_gaussian():
    rng = np.random.default_rng(0)
    moments = rng.standard_normal((2, 3, 3, 8)).astype(np.float32)
    moments[0, 0, 0, 4], moments[0, 0, 0, 5] = 50.0, -100.0  # logvar channels get clamped
    d = DiagonalGaussian.from_moments(jnp.asarray(moments))
    np.testing.assert_array_equal(d.mean, moments[..., :4])
    assert float(d.logvar[0, 0, 0, 0]) == 20.0 and float(d.logvar[0, 0, 0, 1]) == -30.0
    np.testing.assert_allclose(d.std, np.exp(0.5 * np.asarray(d.logvar)), rtol=1e-6)
    np.testing.assert_allclose(d.var, np.exp(np.asarray(d.logvar)), rtol=1e-6)

    mean, logvar = np.asarray(d.mean, np.float64), np.asarray(d.logvar, np.float64)
    kl = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    np.testing.assert_allclose(d.kl(), kl, rtol=1e-5)
    np.testing.assert_allclose(d.kl(d), 0.0, atol=1e-5)
    nll = 0.5 * np.sum(np.log(2 * np.pi) + logvar, axis=(1, 2, 3))  # at x = mean
    np.testing.assert_allclose(d.nll(d.mean), nll, rtol=1e-5)

    key = jax.random.key(3)
    eps = jax.random.normal(key, d.mean.shape)
    np.testing.assert_array_equal(d.sample(key), d.sample_with_eps(eps))
    np.testing.assert_array_equal(d.mode(), d.mean)

    # A pytree: goes through jit and tree utilities.
    assert len(jax.tree.leaves(d)) == 2
    doubled = jax.jit(lambda p: jax.tree.map(lambda a: 2 * a, p))(d)
    assert isinstance(doubled, DiagonalGaussian)
