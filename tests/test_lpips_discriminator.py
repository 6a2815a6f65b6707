"""LPIPS and the PatchGAN discriminator against the upstream goldens, plus their converters."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from torchport import ConversionError, save_state_dict
from vavae_jax import discriminator as disc
from vavae_jax import gan, lpips

TOL = dict(atol=1e-4, rtol=1e-4)

# Jitted once, shared by every test (each distinct input shape compiles once).
LPIPS_MODEL = lpips.LPIPS()
lpips_fn = jax.jit(lambda p, x0, x1: LPIPS_MODEL.apply({"params": p}, x0, x1, per_layer=True))

TINY_D = disc.NLayerDiscriminator(ndf=8, n_layers=3)  # the goldens' width
d_train_fn = jax.jit(lambda v, x: TINY_D.apply(v, x, train=True, mutable=["batch_stats"]))
d_eval_fn = jax.jit(lambda v, x: TINY_D.apply(v, x, train=False))


def nhwc(x):
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def assert_close(name, got, want, **tol):
    """helpers.assert_close (records the error for the parity summary) with this file's TOL."""
    helpers.assert_close(got, want, name=name, **{**TOL, **tol})


def assert_same_state_dict(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def assert_same_tree(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


# ----------------------------------------------------------------------------------------
# LPIPS
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips_golden(golden):
    """The golden file plus its full state dict (VGG weights rebuilt from the meta's rule)."""
    g = golden("lpips_random_vgg")
    state_dict = dict(g.params)
    for k, key, shape, std in g.meta["weight_table"]:
        w = np.random.RandomState(1000 + k).standard_normal(shape).astype(np.float32)
        if key.startswith("lin"):  # stored in the file: check that the rule is read right
            np.testing.assert_array_equal(np.abs(w) * np.float32(std), state_dict[key])
        else:
            state_dict[key] = w * np.float32(std)
    return g, state_dict


@pytest.fixture(scope="module")
def lpips_params(lpips_golden):
    return lpips.params_from_torch(lpips_golden[1])


def test_lpips_matches_golden(lpips_golden, lpips_params):
    g, _ = lpips_golden
    dist, layers = lpips_fn(lpips_params, nhwc(g["input0"]), nhwc(g["input1"]))
    assert dist.shape == (2, 1, 1, 1)
    assert_close(
        "lpips_random_vgg.per_layer_spatial_mean", layers[..., None], g["per_layer_spatial_mean"]
    )
    assert_close("lpips_random_vgg.lpips", dist, g["lpips"])

    same, _ = lpips_fn(lpips_params, nhwc(g["input0"]), nhwc(g["input0"]))
    np.testing.assert_allclose(same, 0.0, atol=1e-12)  # ~1e-16: XLA's conv is not batch-invariant


def test_lpips_round_trips(lpips_golden, lpips_params):
    _, state_dict = lpips_golden
    assert_same_state_dict(lpips.params_to_torch(lpips_params), state_dict)
    assert_same_tree(lpips.params_from_torch(lpips.params_to_torch(lpips_params)), lpips_params)


def test_lpips_two_file_route(lpips_golden, lpips_params, tmp_path):
    """torchvision vgg16 + LPIPS vgg.pth give the same params as the module state dict."""
    _, state_dict = lpips_golden
    vgg16 = {}
    for block, (_, convs) in enumerate(lpips.VGG16_BLOCKS, start=1):
        for _, index in convs:
            for leaf in ("weight", "bias"):
                vgg16[f"features.{index}.{leaf}"] = state_dict[f"net.slice{block}.{index}.{leaf}"]
    vgg16["classifier.6.weight"] = np.zeros((1000, 4096), np.float32)  # ignored
    vgg16["classifier.6.bias"] = np.zeros((1000,), np.float32)
    heads = {k: v for k, v in state_dict.items() if k.startswith("lin")}
    assert_same_tree(lpips.params_from_torchvision(vgg16, heads), lpips_params)

    del vgg16["features.28.bias"]
    save_state_dict(tmp_path / "my_vgg16.pth", vgg16)
    save_state_dict(tmp_path / "vgg.pth", heads)
    with pytest.raises(ConversionError, match=r"(?s)my_vgg16\.pth.*features\.28\.bias"):
        lpips.params_from_torchvision(tmp_path / "my_vgg16.pth", tmp_path / "vgg.pth")


def test_lpips_training_checkpoint_prefix(lpips_golden, lpips_params):
    exported = lpips.params_to_torch(lpips_params, prefix="loss.perceptual_loss.")
    assert all(k.startswith("loss.perceptual_loss.") for k in exported)
    checkpoint = {
        **exported,
        "encoder.conv_in.weight": np.zeros((128, 3, 3, 3), np.float32),
        "loss.logvar": np.zeros((), np.float32),
        "loss.discriminator.main.0.weight": np.zeros((64, 3, 4, 4), np.float32),
    }
    assert_same_tree(lpips.params_from_torch(checkpoint), lpips_params)


def test_lpips_bad_keys(lpips_golden, tmp_path):
    _, good = lpips_golden
    bad = dict(good)
    del bad["net.slice3.12.weight"]
    bad["net.slice6.30.weight"] = np.zeros((3,), np.float32)
    bad["lin2.model.1.weight"] = np.zeros((1, 128, 1, 1), np.float32)
    bad["scaling_layer.shift"] = good["scaling_layer.shift"] + 0.1
    save_state_dict(tmp_path / "bad.pth", bad)
    with pytest.raises(ConversionError) as info:
        lpips.params_from_torch(tmp_path / "bad.pth")
    msg = str(info.value)
    for expected in (
        "bad.pth",
        "missing keys",
        "net.slice3.12.weight",
        "unexpected keys",
        "net.slice6.30.weight",
        "lin2.model.1.weight: got (1, 128, 1, 1), expected (1, 256, 1, 1)",
        "scaling_layer.shift",
    ):
        assert expected in msg, (expected, msg)


# ----------------------------------------------------------------------------------------
# Discriminator
# ----------------------------------------------------------------------------------------


def test_discriminator_matches_golden(golden):
    g = golden("discriminator_tiny")
    variables = disc.params_from_torch(g.params, TINY_D)
    x = nhwc(g["x"])

    logits, updates = d_train_fn(variables, x)
    assert logits.shape == (2, 6, 6, 1)
    assert_close("discriminator_tiny.logits_train_mode", nchw(logits), g["logits_train_mode"])

    after = {"params": variables["params"], **updates}
    state = disc.params_to_torch(after, TINY_D)
    for key, want in g.group("state_after_train_forward").items():
        if key.endswith("num_batches_tracked"):
            assert state[key].dtype == np.int64 and state[key] == want == 1, key
        else:  # tight: flax.linen.BatchNorm's biased-variance update is off by up to 2.6e-4
            assert_close(
                f"discriminator_tiny.state_after_train_forward.{key}",
                state[key],
                want,
                atol=1e-6,
                rtol=1e-6,
            )

    logits_eval = d_eval_fn(after, x)
    assert_close(
        "discriminator_tiny.logits_eval_mode_after_one_train_forward",
        nchw(logits_eval),
        g["logits_eval_mode_after_one_train_forward"],
    )


def test_discriminator_round_trips(golden):
    state_dict = golden("discriminator_tiny").params
    variables = disc.params_from_torch(state_dict, TINY_D)
    assert variables["batch_stats"]["bn3"]["num_batches_tracked"].dtype == np.int32
    assert_same_state_dict(disc.params_to_torch(variables, TINY_D), state_dict)

    exported = disc.params_to_torch(variables, TINY_D, prefix="loss.discriminator.")
    assert_same_tree(disc.params_from_torch(exported, TINY_D), variables)


def test_discriminator_and_gan_losses_in_vavae_training_step(golden):
    """Real-image logits of the full training-loss golden (256x256, keys under loss.*)."""
    g = golden("vavae_train_losses")
    variables = disc.params_from_torch(g.params, TINY_D)  # drops encoder.*, loss.logvar...
    x = ((g["image_uint8"].astype(np.float32) / 255.0) - 0.5) / 0.5  # (B, H, W, 3) already
    logits_real, _ = d_train_fn(variables, jnp.asarray(x))
    assert logits_real.shape == (2, 30, 30, 1)
    # The golden's final conv was scaled by 100 (|logits| up to ~80), so absolute errors are
    # ~100x those of an O(1) output: atol 1e-3 (about 1e-5 of the logit range).
    assert_close(
        "vavae_train.logits_real_disc_pass(discriminator only)",
        nchw(logits_real),
        g["logits_real_disc_pass"],
        atol=1e-3,
        rtol=1e-4,
    )

    real, fake = g["logits_real_disc_pass"], g["logits_fake_disc_pass"]
    disc_factor = float(g["result.train.disc_factor"])
    assert_close(
        "vavae_train.disc_loss(from golden logits)",
        disc_factor * gan.hinge_d_loss(real, fake),
        g["result.train.disc_loss"],
    )
    assert_close(
        "vavae_train.g_loss(from golden logits)",
        gan.generator_loss(g["logits_fake_generator_pass"]),
        g["result.train.g_loss"],
    )
    want = 0.5 * (np.mean(np.logaddexp(0, -real)) + np.mean(np.logaddexp(0, fake)))
    assert_close("formula.vanilla_d_loss", gan.vanilla_d_loss(real, fake), want)


def test_discriminator_bad_keys(golden):
    good = golden("discriminator_tiny").params
    bad = dict(good)
    del bad["main.9.running_var"]
    bad["main.12.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(ConversionError) as info:
        disc.params_from_torch(bad, TINY_D)
    msg = str(info.value)
    assert "main.9.running_var" in msg and "main.12.weight" in msg

    with pytest.raises(ConversionError, match=r"main\.0\.weight: got \(8, 3, 4, 4\)"):
        disc.params_from_torch(good)  # tiny weights into the full-size (ndf=64) model


def test_discriminator_full_size_init_and_layout():
    model = disc.NLayerDiscriminator()  # upstream: ndf=64, n_layers=3
    x = jnp.zeros((1, 256, 256, 3))
    out = jax.eval_shape(
        lambda v: model.apply(v, x, train=False),
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False)),
    )
    assert out.shape == (1, 30, 30, 1)

    boxed = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
        jax.random.key(0)
    )
    specs = nn.get_partition_spec(boxed)["params"]
    assert tuple(specs["conv8"]["kernel"]) == (None, None, "conv_in", "conv_out")
    assert tuple(specs["bn9"]["scale"]) == ("norm",)
    variables = nn.unbox(boxed)
    p, stats = variables["params"], variables["batch_stats"]

    # taming weights_init: conv N(0, 0.02); BN scale N(1, 0.02), bias 0; default conv biases.
    for name in ("conv0", "conv2", "conv5", "conv8", "conv11"):
        k = np.asarray(p[name]["kernel"])
        assert abs(k.std() - 0.02) < 0.1 * 0.02 and abs(k.mean()) < 0.005, name
    for name, fan_in in (("conv0", 3 * 16), ("conv11", 512 * 16)):
        b = np.asarray(p[name]["bias"])
        assert np.all(np.abs(b) <= 1 / np.sqrt(fan_in)) and np.any(b != 0), name
    scale = np.asarray(p["bn9"]["scale"])
    assert abs(scale.mean() - 1) < 0.005 and abs(scale.std() - 0.02) < 0.005
    for name in ("bn3", "bn6", "bn9"):
        np.testing.assert_array_equal(p[name]["bias"], 0.0)
        np.testing.assert_array_equal(stats[name]["mean"], 0.0)
        np.testing.assert_array_equal(stats[name]["var"], 1.0)
        assert stats[name]["num_batches_tracked"] == 0

    state_dict = disc.params_to_torch(variables)
    assert len(state_dict) == 22
    shapes = {k: v.shape for k, v in state_dict.items() if k.endswith("weight")}
    assert shapes == {
        "main.0.weight": (64, 3, 4, 4),
        "main.2.weight": (128, 64, 4, 4),
        "main.3.weight": (128,),
        "main.5.weight": (256, 128, 4, 4),
        "main.6.weight": (256,),
        "main.8.weight": (512, 256, 4, 4),
        "main.9.weight": (512,),
        "main.11.weight": (1, 512, 4, 4),
    }
    assert_same_tree(disc.params_from_torch(state_dict), variables)


def test_batchnorm_per_replica_equals_separate_replicas():
    """replicas=2: each half of the batch is normalised with its own statistics, as two DDP
    processes without SyncBN; the running statistics follow the first half's (rank 0's buffers,
    which DDP broadcasts before every forward)."""
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3)) * 0.5
    variables = TINY_D.init(jax.random.key(1), x, train=False)
    split_d = TINY_D.clone(replicas=2)
    y, upd = jax.jit(lambda v, x: split_d.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x)
    halves = [d_train_fn(variables, x[i:i + 2]) for i in (0, 2)]
    np.testing.assert_allclose(y, jnp.concatenate([h[0] for h in halves]), rtol=1e-5,
                               atol=1e-5)
    for got, want in zip(jax.tree.leaves(upd), jax.tree.leaves(halves[0][1])):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # the halves' statistics differ, so the whole-batch ones would not do
    whole, _ = d_train_fn(variables, x)
    assert float(jnp.abs(whole - y).max()) > 1e-3
    with pytest.raises(ValueError, match="a batch of 4 does not split into 3 equal replica"):
        TINY_D.clone(replicas=3).apply(variables, x, train=True, mutable=["batch_stats"])
