"""Image pipeline: ImageFolder order, upstream preprocessing, global-batch order, per-process
slices, resume (with worker processes, in a fresh process), bad input and its errors."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO
from ml_collections import ConfigDict
from PIL import Image

from configs.vavae import data_config
from launch.data.image_pipeline import make_image_iterator
from launch.data.pipeline import GlobalOrder
from launch.data.preprocess import (
    center_crop_arr,
    decode_rgb,
    resize_random_crop,
    to_model_range,
)
from launch.data.sources import DataError, ImageFolderSource, ImageSource, RawExample


def png_bytes(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


class IndexedSource(ImageSource):
    """In-memory images whose label is their own record index (so batches name their records)."""

    def __init__(self, n: int, size: int = 12, bad: tuple[int, ...] = ()):
        rng = np.random.default_rng(0)
        self.images = [rng.integers(0, 256, (size, size + 2 * (i % 3), 3), np.uint8)
                       for i in range(n)]
        self.bad = set(bad)
        self.num_classes = n

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        data = b"not an image" if index in self.bad else png_bytes(self.images[index])
        return RawExample(data, index, f"mem/{index}")

    def describe(self, index):
        return f"mem/{index}"


def config(**overrides) -> ConfigDict:
    data = data_config()
    data.update(path="mem", image_size=8, preprocess="center_crop", worker_count=0,
                read_threads=2, prefetch=2, bad_fraction_min_items=1, max_bad_fraction=1.0)
    data.update(**overrides)
    return data


def take(iterator, n):
    batches = [next(iterator) for _ in range(n)]
    iterator.close()
    return batches


# ----------------------------------------------------------------------------------------------
# sources and preprocessing


def test_image_folder_order_is_torchvision_image_folder(tmp_path):
    for cls in ["n02", "n01", "n10"]:
        (tmp_path / cls / "sub").mkdir(parents=True)
    img = png_bytes(np.zeros((4, 4, 3), np.uint8))
    for rel in ["n02/b.JPEG", "n02/a.png", "n01/z.jpeg", "n01/sub/a.JPG", "n10/x.webp",
                "n10/notes.txt", "n10/x.JPEG.part"]:
        (tmp_path / rel).write_bytes(img)
    (tmp_path / "stray.JPEG").write_bytes(img)  # files beside the class folders are ignored
    src = ImageFolderSource(tmp_path, exclude=("b.JPEG",))
    assert src.class_names == ["n01", "n02", "n10"]
    names = [os.path.relpath(src.describe(i), tmp_path) for i in range(len(src))]
    # sorted(os.walk) then sorted file names, per class in sorted order
    assert names == ["n01/z.jpeg", "n01/sub/a.JPG", "n02/a.png", "n10/x.webp"]
    assert [src[i].label for i in range(len(src))] == [0, 0, 1, 2]
    assert src[2].data == img


def adm_center_crop(pil_image, image_size):
    """The test's own transcription of ADM's center_crop_arr (guided-diffusion)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                                 resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@pytest.mark.parametrize("hw", [(375, 500), (500, 333), (64, 64), (20, 37), (129, 257)])
def test_center_crop_equals_adm(hw):
    arr = np.random.default_rng(1).integers(0, 256, (*hw, 3), np.uint8)
    got = center_crop_arr(Image.fromarray(arr), 64)
    assert got.shape == (64, 64, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, adm_center_crop(Image.fromarray(arr), 64))


def test_resize_random_crop_is_smallest_max_size_then_crop():
    import cv2

    arr = np.random.default_rng(2).integers(0, 256, (48, 80, 3), np.uint8)
    crops = [resize_random_crop(arr, 32, np.random.default_rng(s)) for s in range(20)]
    resized = cv2.resize(arr, (53, 32), interpolation=cv2.INTER_LINEAR)  # round(80 * 32 / 48)
    offsets = set()
    for crop in crops:
        assert crop.shape == (32, 32, 3)
        matches = [x for x in range(53 - 32 + 1)
                   if np.array_equal(resized[:, x : x + 32], crop)]
        assert matches
        offsets.add(matches[0])
    assert len(offsets) > 5  # random offsets, not a fixed crop


def test_to_model_range_is_bit_exact_to_upstream():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16)
    torchvision = ((torch.from_numpy(x).float().div(255)) - 0.5) / 0.5  # ToTensor + Normalize
    np.testing.assert_array_equal(to_model_range(x), torchvision.numpy())
    np.testing.assert_array_equal(to_model_range(x, "taming"),
                                  (x / 127.5 - 1.0).astype(np.float32))
    import jax.numpy as jnp

    np.testing.assert_array_equal(np.asarray(to_model_range(jnp.asarray(x))), to_model_range(x))


def test_decode_converts_every_mode_to_rgb():
    rgb = np.random.default_rng(3).integers(0, 256, (9, 7, 3), np.uint8)
    cases = {
        "cmyk_jpeg": png_bytes(rgb, "JPEG", mode="CMYK"),
        "gray_jpeg": png_bytes(rgb, "JPEG", mode="L"),
        "png_named_jpeg": png_bytes(rgb, "PNG"),
        "palette_png": png_bytes(rgb, "PNG", mode="P"),
        "rgba_png": png_bytes(rgb, "PNG", mode="RGBA"),
    }
    for name, data in cases.items():
        out = decode_rgb(data)
        want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert out.shape == (9, 7, 3) and out.dtype == np.uint8, name
        np.testing.assert_array_equal(out, want, err_msg=name)
    np.testing.assert_array_equal(decode_rgb(cases["png_named_jpeg"]), rgb)
    jpeg = png_bytes(rgb, "JPEG")
    for bad in [b"", b"plain text", jpeg[: len(jpeg) // 2]]:
        with pytest.raises(Exception):  # noqa: B017 (PIL raises several types)
            decode_rgb(bad)


# ----------------------------------------------------------------------------------------------
# order, slices, flips, resume


def test_order_is_seeded_and_epochs_are_permutations():
    src = IndexedSource(20)
    a = take(make_image_iterator(config(), global_batch_size=6, seed=0, source=src), 6)
    b = take(make_image_iterator(config(), global_batch_size=6, seed=0, source=src), 6)
    c = take(make_image_iterator(config(), global_batch_size=6, seed=1, source=src), 6)
    labels = np.stack([x["labels"] for x in a])
    np.testing.assert_array_equal(labels, np.stack([x["labels"] for x in b]))
    assert not np.array_equal(labels, np.stack([x["labels"] for x in c]))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
    # 20 records / 6 = 3 steps per epoch (2 dropped): each epoch draws distinct records
    for epoch in range(2):
        seen = labels[3 * epoch : 3 * epoch + 3].ravel()
        assert len(set(seen.tolist())) == 18
    assert not np.array_equal(labels[:3], labels[3:])  # reshuffled per epoch


def test_process_slices_union_is_the_global_batch():
    src = IndexedSource(40)
    one = take(make_image_iterator(config(), global_batch_size=8, seed=5, source=src), 5)
    parts = [take(make_image_iterator(config(), global_batch_size=8, seed=5, source=src,
                                      process_index=p, process_count=2), 5) for p in range(2)]
    for step in range(5):
        a, b = parts[0][step], parts[1][step]
        assert not set(a["labels"].tolist()) & set(b["labels"].tolist())
        for key in ("image", "labels"):
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), one[step][key])


def test_flip_probability():
    src = IndexedSource(16, size=8)
    plain = take(make_image_iterator(config(), global_batch_size=8, seed=0, source=src), 2)
    flipped = take(make_image_iterator(config(flip_prob=1.0), global_batch_size=8, seed=0,
                                       source=src), 2)
    for x, y in zip(plain, flipped):
        np.testing.assert_array_equal(x["image"][:, :, ::-1], y["image"])
    half = take(make_image_iterator(config(flip_prob=0.5), global_batch_size=8, seed=0,
                                    source=src), 4)
    mirrored = [np.array_equal(h, p[:, ::-1]) and not np.array_equal(h, p)
                for b, pb in zip(half, plain + take(make_image_iterator(
                    config(), global_batch_size=8, seed=0, source=src, start_step=2), 2))
                for h, p in zip(b["image"], pb["image"])]
    assert 0.2 < np.mean(mirrored) < 0.8


def test_random_crop_depends_only_on_seed_and_slot():
    src = IndexedSource(16, size=16)
    cfg = config(preprocess="random_crop")
    a = take(make_image_iterator(cfg, global_batch_size=4, seed=0, source=src), 3)
    b = take(make_image_iterator(cfg, global_batch_size=4, seed=0, source=src, start_step=1), 2)
    for x, y in zip(a[1:], b):
        np.testing.assert_array_equal(x["image"], y["image"])


RESUME_SCRIPT = """
import sys, numpy as np
from absl import flags
flags.FLAGS.mark_as_parsed()
import orbax.checkpoint as ocp
from configs.vavae import data_config
from launch.data.image_pipeline import make_image_iterator

def main(root, ckpt, out, workers):
    data = data_config()
    data.update(path=root, image_size=16, preprocess="random_crop", worker_count=int(workers),
                read_threads=2, prefetch=2)
    it = make_image_iterator(data, global_batch_size=6, seed=3, num_classes=10)
    with ocp.CheckpointManager(ckpt) as manager:
        state = manager.restore(manager.latest_step(),
                                args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    it.set_state(state)
    batches = [next(it) for _ in range(3)]
    it.close()
    np.savez(out, **{f"{k}{i}": b[k] for i, b in enumerate(batches) for k in b})

if __name__ == "__main__":
    main(*sys.argv[1:])
"""


def test_resume_in_fresh_process_with_workers_is_bit_identical(tmp_path):
    import orbax.checkpoint as ocp

    from launch.data.procedural import write_shapes_dataset

    root = write_shapes_dataset(tmp_path / "shapes", image_size=20, images_per_class=4)
    data = config(path=str(root), image_size=16, preprocess="random_crop", worker_count=1)
    it = make_image_iterator(data, global_batch_size=6, seed=3, num_classes=10)
    first = [next(it) for _ in range(4)]  # 40 images / 6: crosses an epoch boundary at 6
    ckpt = tmp_path / "ckpt"
    with ocp.CheckpointManager(ckpt) as manager:
        manager.save(4, args=ocp.args.Composite(data=ocp.args.JsonSave(it.get_state())))
    expected = [next(it) for _ in range(3)]
    it.close()
    assert json.loads((ckpt / "4" / "data" / "metadata").read_text())["step"] == 4
    del first

    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    out = tmp_path / "resumed.npz"
    proc = subprocess.run([sys.executable, str(script), str(root), str(ckpt), str(out), "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = np.load(out)
    for i, batch in enumerate(expected):
        for key, value in batch.items():
            np.testing.assert_array_equal(resumed[f"{key}{i}"], value, err_msg=f"{key}{i}")

    # the state is host-independent: two processes resume from it and split the same batches
    state = json.loads((ckpt / "4" / "data" / "metadata").read_text())
    halves = []
    for p in range(2):
        part = make_image_iterator(config(path=str(root), image_size=16,
                                          preprocess="random_crop"),
                                   global_batch_size=6, seed=3, process_index=p,
                                   process_count=2)
        part.set_state(state)
        halves.append(take(part, 1)[0])
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]),
                                  expected[0]["image"])
    with pytest.raises(DataError, match="global_batch_size"):
        make_image_iterator(config(path=str(root)), global_batch_size=4,
                            seed=3).set_state(state)


# ----------------------------------------------------------------------------------------------
# bad input


def expected_bad_count(order: GlobalOrder, bad: set, steps: int, max_attempts: int) -> int:
    count = 0
    for step in range(steps):
        for slot in range(order.global_batch_size):
            for attempt in range(max_attempts):
                if order.record(step, slot, attempt) not in bad:
                    break
                count += 1
    return count


def test_bad_items_are_skipped_counted_and_replaced():
    bad = {3, 7, 11}
    src = IndexedSource(24, bad=tuple(bad))
    it = make_image_iterator(config(), global_batch_size=8, seed=0, source=src)
    batches = [next(it) for _ in range(6)]  # two epochs
    state = it.get_state()["monitor"]
    it.close()
    for b in batches:
        assert b["image"].shape == (8, 8, 8, 3)  # always full
        assert not set(b["labels"].tolist()) & bad
        for image, label in zip(b["image"], b["labels"]):  # each slot holds its record's pixels
            np.testing.assert_array_equal(image, center_crop_arr(
                Image.fromarray(src.images[label]), 8))
    order = GlobalOrder(24, 8, 0)
    assert state["num_bad"] == expected_bad_count(order, bad, 6, 16) >= 3
    assert state["num_good"] == 48
    assert {name for name in state["first_bad"]} == {f"mem/{i}" for i in bad}


def test_real_bad_files_in_a_folder(tmp_path):
    rng = np.random.default_rng(0)
    rgb = lambda: rng.integers(0, 256, (40, 40, 3), np.uint8)
    files = {
        "a/good.JPEG": png_bytes(rgb(), "JPEG"),
        "a/cmyk.JPEG": png_bytes(rgb(), "JPEG", mode="CMYK"),
        "a/gray.JPEG": png_bytes(rgb(), "JPEG", mode="L"),
        "a/png.JPEG": png_bytes(rgb(), "PNG"),
        "b/small.png": png_bytes(rng.integers(0, 256, (10, 12, 3), np.uint8)),
        "b/good.JPEG": png_bytes(rgb(), "JPEG"),
        "b/empty.JPEG": b"",
        "b/text.JPEG": b"this is not an image",
        "b/truncated.JPEG": png_bytes(rgb(), "JPEG")[:300],
    }
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    data = config(path=str(tmp_path), image_size=16, shuffle=False)
    it = make_image_iterator(data, global_batch_size=3, seed=0, num_classes=2)
    batches = [next(it) for _ in range(3)]  # one epoch in file order
    monitor = it.get_state()["monitor"]
    it.close()
    bad_names = {"b/empty.JPEG", "b/text.JPEG", "b/truncated.JPEG"}
    got = {os.path.relpath(p, tmp_path) for p in monitor["first_bad"]}
    assert bad_names <= got and got <= bad_names  # only undecodable files are skipped
    assert monitor["num_upscaled"] >= 1  # the 10x12 image, upscaled as upstream does
    assert all(b["image"].shape == (3, 16, 16, 3) for b in batches)
    np.testing.assert_array_equal(batches[0]["labels"], [0, 0, 0])  # cmyk, good, gray
    order = GlobalOrder(9, 3, 0, shuffle=False)
    bad_records = {i for i in range(9) if os.path.relpath(
        it.monitor.describe(i), tmp_path) in bad_names}
    assert monitor["num_bad"] == expected_bad_count(order, bad_records, 3, 16)


def test_too_many_bad_items_stop_with_names():
    src = IndexedSource(20, bad=tuple(range(0, 20, 2)))  # half of the data
    it = make_image_iterator(config(max_bad_fraction=0.1, bad_fraction_min_items=16),
                             global_batch_size=8, seed=0, source=src)
    with pytest.raises(DataError, match=r"max_bad_fraction=0.1; first: mem/\d+"):
        for _ in range(10):
            next(it)
    it.close()


def test_a_directory_of_non_images_is_an_error_not_skipped(tmp_path):
    for i in range(6):
        (tmp_path / "cls").mkdir(exist_ok=True)
        (tmp_path / "cls" / f"{i}.JPEG").write_text("<html>not found</html>")
    it = make_image_iterator(config(path=str(tmp_path), max_attempts=4), global_batch_size=2,
                             seed=0)
    with pytest.raises(DataError, match=r"4 bad items in a row .*cls/\d\.JPEG"):
        next(it)
    it.close()


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderSource(tmp_path / "missing")
    with pytest.raises(DataError, match="no class folders"):
        ImageFolderSource(tmp_path)
    (tmp_path / "n01").mkdir()
    with pytest.raises(DataError, match="no image files"):
        ImageFolderSource(tmp_path)
    (tmp_path / "n01" / "x.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    (tmp_path / "n02").mkdir()  # an empty class: torchvision's ImageFolder raises too
    (tmp_path / "n02" / "notes.txt").write_text("no image")
    with pytest.raises(DataError, match="1 of 2 class folders hold no image files.*: n02$"):
        ImageFolderSource(tmp_path)
    (tmp_path / "n02" / "notes.txt").unlink()
    (tmp_path / "n02").rmdir()
    with pytest.raises(DataError, match="1 classes but the model has num_classes=1000"):
        make_image_iterator(config(path=str(tmp_path)), global_batch_size=1, seed=0,
                            num_classes=1000)
    with pytest.raises(DataError, match="cannot fill one global batch of 4"):
        make_image_iterator(config(path=str(tmp_path)), global_batch_size=4, seed=0)
    with pytest.raises(DataError, match="not divisible by the 3 processes"):
        make_image_iterator(config(path=str(tmp_path)), global_batch_size=4, seed=0,
                            process_index=0, process_count=3)
    with pytest.raises(DataError, match="unknown config.data.source"):
        make_image_iterator(config(path=str(tmp_path), source="webdataset"),
                            global_batch_size=1, seed=0)


def test_global_arrays_on_a_mesh():
    import jax

    from launch.sharding import create_mesh

    mesh = create_mesh({"data": 2, "fsdp": 4})
    src = IndexedSource(16)
    host = take(make_image_iterator(config(), global_batch_size=8, seed=0, source=src), 1)[0]
    it = make_image_iterator(config(), global_batch_size=8, seed=0, source=src, mesh=mesh)
    batch = take(it, 1)[0]
    assert isinstance(batch["image"], jax.Array)
    assert batch["image"].sharding.spec[0] == ("data", "fsdp")
    assert len(batch["image"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(batch["image"]), host["image"])


MULTIHOST_SCRIPT = """
import sys, numpy as np
from absl import flags
flags.FLAGS.mark_as_parsed()
from launch import distributed
distributed.initialize()
import jax
from jax.experimental import multihost_utils
from configs.vavae import data_config
from launch.data.image_pipeline import make_image_iterator
from launch.sharding import create_mesh

def main(root, out):
    data = data_config()
    data.update(path=root, image_size=16, preprocess="random_crop", worker_count=0,
                read_threads=2, prefetch=2)
    mesh = create_mesh({"data": -1})
    it = make_image_iterator(data, global_batch_size=8, seed=4, num_classes=10, mesh=mesh)
    batches = [next(it) for _ in range(2)]
    it.close()
    assert batches[0]["image"].shape == (8, 16, 16, 3) and jax.device_count() == 4
    gathered = [multihost_utils.process_allgather(b["image"], tiled=True) for b in batches]
    if jax.process_index() == 0:
        np.savez(out, *gathered)

if __name__ == "__main__":
    main(*sys.argv[1:])
"""


def test_two_jax_processes_assemble_the_one_process_batches(tmp_path):
    from helpers import run_processes

    from launch.data.procedural import write_shapes_dataset

    root = write_shapes_dataset(tmp_path / "shapes", image_size=20, images_per_class=2)
    script = tmp_path / "multihost.py"
    script.write_text(MULTIHOST_SCRIPT)
    run_processes([str(script), str(root), str(tmp_path / "out.npz")])
    data = config(path=str(root), image_size=16, preprocess="random_crop")
    want = take(make_image_iterator(data, global_batch_size=8, seed=4), 2)
    got = np.load(tmp_path / "out.npz")
    for i, batch in enumerate(want):
        np.testing.assert_array_equal(got[f"arr_{i}"], batch["image"])
