"""The Flax FID Inception against the real pytorch-fid 0.3.0, on random weights.

pytorch-fid needs only torchvision's pure-Python ``torchvision.models.inception``. Where
``import torchvision`` fails (a CUDA torchvision wheel next to a CPU torch: its C operators do not
register), the package is stood in for by a bare module pointing at the installed files, so that
the pure-Python submodules still import. The stand-in stays in ``sys.modules`` for the session.

The weights are random (nothing is downloaded): pytorch-fid's ``load_state_dict_from_url`` is
patched to return a random state dict in the ``pt_inception-2015-12-05`` layout, which
pytorch-fid then loads with ``strict=True`` (so the key set and every shape are checked against the
real architecture too).
"""

import importlib.metadata
import importlib.util
import re
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from eval_jax import inception_convert
from eval_jax.inception import (
    NUM_CLASSES,
    POOL_DIM,
    SPATIAL_DIM,
    InceptionV3,
    resize_bilinear,
    resize_bilinear_tf1,
)
from eval_jax.metrics import feature_statistics, frechet_distance
from torchport import ConversionError, expected_torch_shapes, save_state_dict

torch = pytest.importorskip("torch")
F = torch.nn.functional

RTOL = 1e-4


def _import_pytorch_fid():
    pytest.importorskip("pytorch_fid")
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - e.g. "operator torchvision::nms does not exist"
        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("torchvision is not installed")
        shim = types.ModuleType("torchvision")
        shim.__path__ = list(spec.submodule_search_locations)
        shim.__version__ = importlib.metadata.version("torchvision")
        sys.modules["torchvision"] = shim
        import torchvision.models.inception  # noqa: F401 - pure Python

        shim.models = sys.modules["torchvision.models"]
    import pytorch_fid.fid_score
    import pytorch_fid.inception

    return pytorch_fid


def _random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in the pt_inception layout (with BatchNorm counters, as state_dict())."""
    rng = np.random.default_rng(seed)
    shapes = expected_torch_shapes(inception_convert.torch_rules(), _flat_abstract())
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("conv.weight") or key == "fc.weight":
            fan_in = int(np.prod(shape[1:]))
            std = np.float32(np.sqrt(2.0 / fan_in))  # He: keeps activations O(1)
            value = rng.standard_normal(shape, dtype=np.float32) * std
        elif key.endswith("bn.weight"):
            value = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("bn.running_var"):
            value = rng.uniform(0.5, 2.0, shape)  # positive
        else:  # bn.bias, bn.running_mean, fc.bias
            value = rng.normal(0.0, 0.2, shape)
        sd[key] = value.astype(np.float32)
        if key.endswith("bn.running_var"):
            sd[key.replace("running_var", "num_batches_tracked")] = np.zeros((), np.int64)
    return sd


def _flat_abstract():
    return traverse_util.flatten_dict(inception_convert.abstract_params())


@pytest.fixture(scope="module")
def state_dict():
    return _random_state_dict()


def _without_download(build, state_dict):
    """Call `build()` with pytorch-fid's weight download replaced by `state_dict`."""
    fid = _import_pytorch_fid()
    tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fid.inception, "load_state_dict_from_url", lambda *a, **k: tensors)
        return build(fid.inception)


@pytest.fixture(scope="module")
def torch_model(state_dict):
    build = lambda m: m.InceptionV3([3], resize_input=True, normalize_input=True)
    return _without_download(build, state_dict).eval()


def _images():
    """3 uint8 images at 64x64 (upsampled to 299) and 2 float [0, 255] ones at 320x320
    (downsampled)."""
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    large = rng.uniform(0.0, 255.0, (2, 320, 320, 3)).astype(np.float32)
    return small, large


def _torch_features(model, state_dict, images):
    """pool3, logits (fc on pool3), spatial (Mixed_6d.branch1x1, [:7], NHWC-flattened)."""
    taps = {}
    mixed_6d = model.blocks[2][6]
    hook = mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: taps.update(spatial=o))
    x = torch.from_numpy(np.asarray(images, np.float32) / np.float32(255.0))
    with torch.no_grad():
        (pool3,) = model(x.permute(0, 3, 1, 2).contiguous())
        pool3 = pool3[:, :, 0, 0]
        fc_weight, fc_bias = (torch.from_numpy(state_dict[f"fc.{k}"]) for k in ("weight", "bias"))
        logits = F.linear(pool3, fc_weight, fc_bias)
    hook.remove()
    spatial = taps["spatial"][:, :7].permute(0, 2, 3, 1).reshape(len(images), -1)
    return {"pool3": pool3.numpy(), "logits": logits.numpy(), "spatial": spatial.numpy()}


@pytest.fixture(scope="module")
def features(torch_model, state_dict):
    """Both implementations' outputs on both image sets; one jit, compiled once per shape."""
    variables = inception_convert.params_from_torch(state_dict)
    apply = jax.jit(InceptionV3().apply)
    out = {}
    timings = {}
    for name, images in zip(("small", "large"), _images()):
        start = time.perf_counter()
        ours = jax.tree.map(np.asarray, apply(variables, images))
        timings[f"jax {name}"] = time.perf_counter() - start
        start = time.perf_counter()
        theirs = _torch_features(torch_model, state_dict, images)
        timings[f"torch {name}"] = time.perf_counter() - start
        out[name] = (ours, theirs)
    print("timings (s):", {k: round(v, 2) for k, v in timings.items()})
    return out


def _relative_error(got, want) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("images", ["small", "large"])
@pytest.mark.parametrize("output", ["pool3", "logits", "spatial"])
def test_matches_pytorch_fid(features, images, output):
    ours, theirs = features[images]
    got, want = ours[output], theirs[output]
    assert got.shape == want.shape
    assert got.dtype == np.float32
    err = _relative_error(got, want)
    scale = np.abs(want).max()
    print(f"{images} {output}: max|diff| / max|ref| = {err:.2e} (max|ref| {scale:.3g})")
    assert err < RTOL
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale)


def test_output_shapes_and_unbiased_logits(features, state_dict):
    ours, _ = features["small"]
    assert ours["pool3"].shape == (3, POOL_DIM)
    assert ours["spatial"].shape == (3, SPATIAL_DIM)
    assert ours["logits"].shape == ours["logits_unbiased"].shape == (3, NUM_CLASSES)
    np.testing.assert_allclose(
        ours["logits_unbiased"],
        ours["pool3"] @ state_dict["fc.weight"].T,
        rtol=1e-5,
        atol=1e-5 * np.abs(ours["logits"]).max(),
    )
    np.testing.assert_allclose(
        ours["logits"] - ours["logits_unbiased"],
        np.broadcast_to(state_dict["fc.bias"], (3, NUM_CLASSES)),
        atol=1e-4 * np.abs(ours["logits"]).max(),
    )


def _frechet(a, b) -> float:
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def test_fid_matches_pytorch_fid(features):
    """FID and sFID between the two image sets: from our features vs from pytorch-fid's.

    On the first 512 feature columns: `frechet_distance` takes two eigendecompositions of a
    D x D matrix, seconds each at D = 2048 on a 2-core CI machine.
    """
    (ours_a, theirs_a), (ours_b, theirs_b) = features["small"], features["large"]
    for kind in ("pool3", "spatial"):
        ours = _frechet(ours_a[kind][:, :512], ours_b[kind][:, :512])
        theirs = _frechet(theirs_a[kind][:, :512], theirs_b[kind][:, :512])
        print(f"{kind} Frechet distance: from our features {ours:.8g}, from pytorch-fid's "
              f"{theirs:.8g}, relative difference {abs(ours - theirs) / abs(theirs):.2e}")
        assert abs(ours - theirs) <= RTOL * abs(theirs)


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")
def test_frechet_distance_matches_pytorch_fid_formula(features):
    """Our `frechet_distance` vs pytorch-fid's `calculate_frechet_distance` (scipy sqrtm).

    scipy's sqrtm is only accurate for non-singular covariances (and takes seconds at 2048
    dims), so the pool3 features are cut into 8-wide pieces: 384 and 256 samples of 8 dims.
    Ours on our features, ours on pytorch-fid's features and pytorch-fid's own all agree."""
    fid = _import_pytorch_fid()
    (ours_a, theirs_a), (ours_b, theirs_b) = features["small"], features["large"]
    pieces = lambda f: f["pool3"].reshape(-1, 8)
    reference = fid.fid_score.calculate_frechet_distance(
        *feature_statistics(pieces(theirs_a)), *feature_statistics(pieces(theirs_b))
    )
    same_features = _frechet(pieces(theirs_a), pieces(theirs_b))
    ours = _frechet(pieces(ours_a), pieces(ours_b))
    print(f"pool3 in 8-dim pieces: ours {ours:.8g}, ours on pytorch-fid features "
          f"{same_features:.8g}, pytorch-fid {reference:.8g}")
    assert abs(same_features - reference) <= 1e-6 * abs(reference)
    assert abs(ours - reference) <= RTOL * abs(reference)


def test_resize_matches_torch_interpolate():
    """Non-antialiased bilinear resize, up and down, non-square, against F.interpolate."""
    rng = np.random.default_rng(2)
    for size_in, size_out in [((7, 5), (299, 299)), ((320, 301), (299, 299)), ((9, 9), (4, 13))]:
        x = rng.normal(size=(2, *size_in, 3)).astype(np.float32)
        got = np.asarray(resize_bilinear(x, size_out))
        want = F.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2), size=size_out, mode="bilinear",
            align_corners=False,
        ).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _tf1_resize_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1's ResizeBilinear kernel (align_corners=False, half_pixel_centers=False), pixel by
    pixel in float32: src = i * (in / out), taps floor / ceil, top = tl + (tr - tl) * dx, ...,
    out = top + (bottom - top) * dy."""
    n, in_h, in_w, c = x.shape
    f32 = np.float32
    out = np.zeros((n, out_h, out_w, c), f32)
    for i in range(out_h):
        sy = f32(i) * (f32(in_h) / f32(out_h))
        y0, y1, dy = int(np.floor(sy)), min(int(np.ceil(sy)), in_h - 1), f32(sy - np.floor(sy))
        for j in range(out_w):
            sx = f32(j) * (f32(in_w) / f32(out_w))
            x0, x1 = int(np.floor(sx)), min(int(np.ceil(sx)), in_w - 1)
            dx = f32(sx - np.floor(sx))
            top = x[:, y0, x0] + (x[:, y0, x1] - x[:, y0, x0]) * dx
            bottom = x[:, y1, x0] + (x[:, y1, x1] - x[:, y1, x0]) * dx
            out[:, i, j] = top + (bottom - top) * dy
    return out


def test_tf1_resize_matches_the_kernel_and_tensorflow():
    """The ADM graph's resize: hand values, a pixel-by-pixel model of TF's kernel (exactly),
    TensorFlow itself where it is installed (it is not a dependency; with TF 2.21 on the Zen 5
    host the outputs were equal bit for bit, 256 -> 299 included), and not PyTorch's grid."""
    line = np.float32([0, 3, 6, 9]).reshape(1, 1, 4, 1)
    np.testing.assert_allclose(np.asarray(resize_bilinear_tf1(line, (1, 3)))[0, 0, :, 0],
                               [0, 4, 8], rtol=1e-6)  # samples 0, 4/3, 8/3
    rng = np.random.default_rng(3)
    cases = [((7, 5), (11, 13)), ((40, 36), (17, 23)), ((9, 9), (9, 4))]
    for size_in, size_out in cases:
        x = rng.uniform(0, 255, (2, *size_in, 3)).astype(np.float32)
        got = np.asarray(resize_bilinear_tf1(x, size_out))
        np.testing.assert_array_equal(got, _tf1_resize_reference(x, *size_out))
        assert np.abs(got - np.asarray(resize_bilinear(x, size_out))).max() > 1.0
    try:
        import tensorflow as tf
    except ImportError:
        return
    x = rng.integers(0, 256, (1, 256, 256, 3)).astype(np.float32)
    want = tf.compat.v1.image.resize_bilinear(x, [299, 299], align_corners=False).numpy()
    np.testing.assert_allclose(np.asarray(resize_bilinear_tf1(x, (299, 299))), want, atol=1e-4)


def test_preprocess_reaches_the_network_input():
    images = np.random.default_rng(4).integers(0, 256, (2, 20, 24, 3)).astype(np.uint8)
    x = images.astype(np.float32)

    def network_input(**kw):
        return np.asarray(InceptionV3(**kw).apply({}, images, method="network_input"))

    np.testing.assert_allclose(network_input(preprocess="adm"),
                               (np.asarray(resize_bilinear_tf1(x, (299, 299))) - 128) / 128,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(network_input(),
                               2 * np.asarray(resize_bilinear(x / 255, (299, 299))) - 1,
                               rtol=1e-6, atol=1e-6)
    same = network_input(preprocess="adm", resize_input=False)
    np.testing.assert_array_equal(same, (x - 128) / 128)
    with pytest.raises(ValueError, match="preprocess='tf2': expected one of"):
        network_input(preprocess="tf2")


def test_state_dict_order_matches_pytorch(torch_model, state_dict):
    """The exported keys follow PyTorch's state_dict order, in both layouts."""
    variables = inception_convert.params_from_torch(state_dict)
    full = _without_download(lambda m: m.fid_inception_v3(), state_dict)
    assert list(inception_convert.params_to_torch(variables)) == list(full.state_dict())

    module_sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    assert inception_convert.detect_layout(module_sd) == "pytorch_fid"
    body = inception_convert.params_from_torch(module_sd)  # -> InceptionV3(num_classes=0)
    assert "fc" not in body["params"]
    exported = inception_convert.params_to_torch(body, layout="pytorch_fid")
    assert list(exported) == list(module_sd)
    for key, value in module_sd.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    no_fc = {k: v for k, v in variables["params"].items() if k != "fc"}
    assert jax.tree.all(jax.tree.map(np.array_equal, body, {**variables, "params": no_fc}))


def test_round_trip_is_exact(state_dict):
    back = inception_convert.params_to_torch(inception_convert.params_from_torch(state_dict))
    assert list(back) == list(state_dict)
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    without = inception_convert.params_to_torch(
        inception_convert.params_from_torch(state_dict), num_batches_tracked=False
    )
    assert set(without) == {k for k in state_dict if not k.endswith("num_batches_tracked")}


def test_pytorch_fid_module_layout_needs_a_model_without_fc(torch_model):
    module_sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    with pytest.raises(ConversionError, match="num_classes=0"):
        inception_convert.params_from_torch(module_sd, InceptionV3())


def test_wrong_shape_names_the_key(state_dict):
    bad = dict(state_dict)
    bad["Mixed_6d.branch1x1.conv.weight"] = np.zeros((192, 768, 3, 3), np.float32)
    del bad["fc.bias"]
    with pytest.raises(ConversionError) as info:
        inception_convert.params_from_torch(bad)
    message = str(info.value)
    assert "Mixed_6d.branch1x1.conv.weight: got (192, 768, 3, 3), expected (192, 768, 1, 1)" in (
        message
    )
    assert "fc.bias" in message


def test_loads_torch_saved_pth_and_safetensors(tmp_path, state_dict):
    direct = inception_convert.params_from_torch(state_dict)
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)
    loaded = inception_convert.params_from_torch(str(path))
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, direct))
    save_state_dict(tmp_path / "inception.safetensors", state_dict)
    loaded = inception_convert.params_from_torch(tmp_path / "inception.safetensors")
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, direct))

    bad = dict(state_dict, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
    torch.save({k: torch.from_numpy(v) for k, v in bad.items()}, path)
    with pytest.raises(ConversionError, match=re.escape(str(path))) as info:
        inception_convert.params_from_torch(path)
    assert "fc.weight: got (1000, 2048), expected (1008, 2048)" in str(info.value)


def test_abstract_params_allocate_nothing():
    tree = inception_convert.abstract_params()
    leaves = jax.tree.leaves(tree)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert tree["params"]["fc"]["kernel"].shape == (POOL_DIM, NUM_CLASSES)
    assert tree["batch_stats"]["Mixed_6d"]["branch1x1"]["bn"]["mean"].shape == (192,)
    assert "fc" not in inception_convert.abstract_params(InceptionV3(num_classes=0))["params"]


def test_bfloat16_compute_keeps_float32_outputs():
    model = InceptionV3(dtype=jnp.bfloat16)
    images = jax.ShapeDtypeStruct((2, 32, 48, 3), jnp.uint8)
    out = jax.eval_shape(model.apply, inception_convert.abstract_params(model), images)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        "pool3": ((2, POOL_DIM), jnp.float32),
        "spatial": ((2, SPATIAL_DIM), jnp.float32),
        "logits": ((2, NUM_CLASSES), jnp.float32),
        "logits_unbiased": ((2, NUM_CLASSES), jnp.float32),
    }
