"""The procedural shapes dataset: deterministic, ImageFolder layout, distinct classes, CLI."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from launch.data.procedural import (
    CLASS_NAMES,
    ensure_shapes_dataset,
    render_shape,
    write_shapes_dataset,
)
from launch.data.sources import ImageFolderSource

REPO = pathlib.Path(__file__).resolve().parents[1]
FOREGROUND = 130  # every class colour has a channel above this, every background stays below


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _render_all(image_size: int, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for c in range(len(CLASS_NAMES)):
        for i in range(per_class):
            images.append(render_shape(c, image_size, np.random.default_rng([seed, c, i])))
            labels.append(c)
    return np.stack(images), np.array(labels)


def _nearest_class_mean_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Class means from the even items, accuracy on the odd (held-out) ones."""
    train = np.arange(len(labels)) % 2 == 0
    means = np.stack([features[train & (labels == c)].mean(0) for c in range(len(CLASS_NAMES))])
    distances = ((features[~train][:, None] - means[None]) ** 2).sum(-1)
    return float((distances.argmin(1) == labels[~train]).mean())


def _colour_features(images: np.ndarray) -> np.ndarray:
    """4x4x4-bin colour histogram of the foreground pixels: ignores shape and position."""
    bins = images.astype(np.int64) * 4 // 256
    index = bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]
    masks = images.max(-1) > FOREGROUND
    return np.stack([np.bincount(i[m], minlength=64) / m.sum() for i, m in zip(index, masks)])


def _shape_features(images: np.ndarray) -> np.ndarray:
    """Histogram of foreground distances to the foreground centroid, in units of sqrt(area):
    ignores colour, position, rotation and scale, so only the shape is left."""
    masks = images.max(-1) > FOREGROUND
    ys, xs = np.mgrid[0:images.shape[1], 0:images.shape[2]]
    features = []
    for m in masks:
        y, x = ys[m], xs[m]
        d = np.hypot(y - y.mean(), x - x.mean()) / np.sqrt(m.sum())
        features.append(np.histogram(d, bins=12, range=(0, 1.2))[0] / m.sum())
    return np.stack(features)


@pytest.mark.parametrize("image_size", [32, 64, 48])
def test_render_shape_returns_uint8_rgb(image_size):
    for c in range(len(CLASS_NAMES)):
        image = render_shape(c, image_size, np.random.default_rng(c))
        assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
    with pytest.raises(ValueError, match="class_index"):
        render_shape(len(CLASS_NAMES), 32, np.random.default_rng(0))


def test_write_is_deterministic(tmp_path):
    a = _files(pathlib.Path(write_shapes_dataset(tmp_path / "a", 32, 3, seed=7)))
    b = _files(pathlib.Path(write_shapes_dataset(tmp_path / "b", 32, 3, seed=7)))
    c = _files(pathlib.Path(write_shapes_dataset(tmp_path / "c", 32, 3, seed=8)))
    assert a == b
    images = [name for name in a if name.endswith(".png")]
    assert len(images) == 30 and all(a[name] != c[name] for name in images)


def test_layout_is_an_image_folder_tree(tmp_path):
    root = pathlib.Path(write_shapes_dataset(tmp_path / "shapes", 32, 4, num_classes=6))
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == list(CLASS_NAMES[:6])
    assert list(CLASS_NAMES) == sorted(CLASS_NAMES) and len(set(CLASS_NAMES)) == 10
    for name in folders:
        files = sorted(p.name for p in (root / name).iterdir())
        assert files == [f"{name}_{i:05d}.png" for i in range(4)]
        with Image.open(root / name / files[0]) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
    assert json.loads((root / ".complete").read_text())["num_classes"] == 6
    # the repo's own ImageFolder reader labels folders in CLASS_NAMES order
    source = ImageFolderSource(root)
    assert source.class_names == list(CLASS_NAMES[:6]) and len(source) == 24
    assert [source[i].label for i in range(0, 24, 4)] == list(range(6))


def test_argument_errors(tmp_path):
    for num_classes in (0, len(CLASS_NAMES) + 1):
        with pytest.raises(ValueError, match="num_classes"):
            write_shapes_dataset(tmp_path, 32, 1, num_classes=num_classes)
    assert not any(tmp_path.iterdir())


def test_classes_differ_in_colour_and_in_shape():
    # 20 training and 20 held-out images per class, at the smallest size
    images, labels = _render_all(32, 40)
    assert _nearest_class_mean_accuracy(_colour_features(images), labels) > 0.9
    assert _nearest_class_mean_accuracy(_shape_features(images), labels) > 0.9
    # the check can fail: with labels that say nothing about the images it is near chance
    shuffled = np.random.default_rng(0).permutation(labels)
    assert _nearest_class_mean_accuracy(_colour_features(images), shuffled) < 0.3


def test_images_vary_within_a_class():
    images, labels = _render_all(32, 8)
    masks = images.max(-1) > FOREGROUND
    assert masks.mean((1, 2)).min() > 0.03  # the foreground is always there and visible
    for c in range(len(CLASS_NAMES)):
        group = images[labels == c].astype(np.float64)
        diffs = [np.abs(group[i] - group[j]).mean()
                 for i in range(len(group)) for j in range(i + 1, len(group))]
        assert min(diffs) > 0 and np.mean(diffs) > 10, CLASS_NAMES[c]
        # the foreground moves and changes size, not just the background
        group_masks = masks[labels == c]
        assert len({m.tobytes() for m in group_masks}) == len(group_masks), CLASS_NAMES[c]
        assert np.ptp(group_masks.sum((1, 2))) > 20, CLASS_NAMES[c]


def test_ensure_is_a_noop_on_a_complete_tree(tmp_path):
    root = tmp_path / "shapes"
    ensure_shapes_dataset(root, 32, 2, num_classes=3)
    paths = [p for p in root.rglob("*") if p.is_file()]
    for p in paths:  # old mtimes: any rewrite would show, whatever the clock resolution
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    assert ensure_shapes_dataset(root, 32, 2, num_classes=3) == str(root)
    assert all(p.stat().st_mtime_ns == 1_000_000_000 for p in paths)


def test_ensure_rewrites_a_partial_tree(tmp_path):
    root = tmp_path / "shapes"
    ensure_shapes_dataset(root, 32, 3, num_classes=4)
    before = _files(root)
    (root / ".complete").unlink()
    (root / CLASS_NAMES[1] / f"{CLASS_NAMES[1]}_00002.png").unlink()
    (root / CLASS_NAMES[0] / f"{CLASS_NAMES[0]}_00099.png").write_bytes(b"stale")
    (root / CLASS_NAMES[7]).mkdir()  # left by an interrupted write with more classes
    (root / "README.txt").write_text("not ours")
    ensure_shapes_dataset(root, 32, 3, num_classes=4)
    after = _files(root)
    assert after.pop("README.txt") == b"not ours"
    assert after == before and not (root / CLASS_NAMES[7]).exists()


def test_ensure_raises_on_different_arguments(tmp_path):
    root = tmp_path / "shapes"
    ensure_shapes_dataset(root, 32, 2, num_classes=2)
    with pytest.raises(ValueError) as error:
        ensure_shapes_dataset(root, 64, 2, num_classes=2)
    message = str(error.value)
    assert str(root) in message and "image_size=32" in message and "image_size=64" in message


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.data.procedural", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_cli_writes_the_tree_and_a_grid(tmp_path):
    out, grid = tmp_path / "shapes", tmp_path / "grid.png"
    result = _cli("--out", str(out), "--image_size", "32", "--images_per_class", "2",
                  "--num_classes", "3", "--grid", str(grid))
    assert result.returncode == 0, result.stderr
    assert "6 images" in result.stdout and len(result.stdout.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == [".complete", *CLASS_NAMES[:3]]
    assert _files(out) == _files(pathlib.Path(write_shapes_dataset(tmp_path / "api", 32, 2,
                                                                   num_classes=3)))
    with Image.open(grid) as image:  # 3 rows and 8 columns of 32 px, 2 px apart
        assert image.size == (8 * 34 - 2, 3 * 34 - 2)


def test_cli_mismatch_is_one_readable_line(tmp_path):
    out = tmp_path / "shapes"
    write_shapes_dataset(out, 32, 2, num_classes=2)
    result = _cli("--out", str(out), "--image_size", "64", "--images_per_class", "2",
                  "--num_classes", "2")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "image_size=32" in lines[0] and str(out) in lines[0]
