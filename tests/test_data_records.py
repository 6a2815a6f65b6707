"""ArrayRecord shards (writer, reader, CLI) and the tfds array_record source, on tiny data."""

import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from launch.data.array_record import (
    ArrayRecordImageSource,
    encode_record,
    write_array_record_shards,
)
from launch.data.sources import DataError, ImageFolderSource, ImageSource, RawExample
from launch.data.tfds_source import TfdsImageSource

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["cat", "dog", "eel"]


def _encoded(value: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path):
    """root/<class>/<image>: 3 classes x 2 images (JPEG and PNG), plus one corrupt JPEG."""
    root = tmp_path / "train"
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        (root / name / "a.jpg").write_bytes(_encoded(40 * c, "JPEG"))
        (root / name / "b.png").write_bytes(_encoded(40 * c + 1, "PNG"))
    (root / "eel" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


@pytest.fixture
def shards(tree, tmp_path):
    out = tmp_path / "shards"
    paths = write_array_record_shards(ImageFolderSource(tree), out, num_shards=3)
    return out, paths


def test_write_and_read_back(tree, shards):
    out, paths = shards
    assert [os.path.basename(p) for p in paths] == [
        f"train-{k:05d}-of-00003.array_record" for k in range(3)]
    assert sorted(os.listdir(out)) == sorted(["classes.json", *map(os.path.basename, paths)])
    folder = ImageFolderSource(tree)
    source = ArrayRecordImageSource(out)
    assert len(source) == len(folder) == 7
    assert source.class_names == CLASSES and source.num_classes == 3
    for i in range(len(folder)):
        want, got = folder[i], source[i]
        assert got.data == want.data  # stored as-is, the corrupt file included
        assert got.label == want.label
        assert got.name == os.path.relpath(want.name, tree)
    assert [source[i].label for i in range(7)] == [0, 0, 1, 1, 2, 2, 2]
    assert source.describe(6) == f"{paths[2]}#2"
    info = json.loads((out / "classes.json").read_text())
    assert info["num_records"] == 7 and info["class_names"] == CLASSES


def test_read_glob_and_single_file(shards):
    out, paths = shards
    assert len(ArrayRecordImageSource(paths[1])) == 2
    both = ArrayRecordImageSource(str(out / "train-0000[12]-*.array_record"))
    assert len(both) == 5 and both[0].name == "dog/a.jpg"  # shards of 2, 2, 3 records


def test_parallel_writer_matches_serial(tree, tmp_path, shards):
    out, _ = shards
    write_array_record_shards(ImageFolderSource(tree), tmp_path / "par", 3, workers=3)
    serial, parallel = ArrayRecordImageSource(out), ArrayRecordImageSource(tmp_path / "par")
    assert [serial[i] for i in range(7)] == [parallel[i] for i in range(7)]


def test_writer_refuses_existing_shards_unless_overwrite(tree, shards):
    out, _ = shards
    with pytest.raises(DataError, match="already holds 3 shards"):
        write_array_record_shards(ImageFolderSource(tree), out, 2)
    paths = write_array_record_shards(ImageFolderSource(tree), out, 2, overwrite=True)
    assert sorted(p for p in os.listdir(out) if p.endswith(".array_record")) == sorted(
        os.path.basename(p) for p in paths)
    assert len(ArrayRecordImageSource(out)) == 7


class _FailingSource(ImageSource):
    """Three records; reading the last one fails, as an unreadable file would."""

    num_classes, class_names = 1, ["only"]

    def __len__(self):
        return 3

    def __getitem__(self, index):
        if index == 2:
            raise OSError("disk on fire")
        return RawExample(b"img", 0, f"{index}.jpg")


def test_failed_write_leaves_no_half_shard(tmp_path):
    with pytest.raises(OSError, match="disk on fire"):
        write_array_record_shards(_FailingSource(), tmp_path / "out", 2)
    # Shard 0 (records 0) is complete; shard 1 (records 1, 2) failed and left nothing behind,
    # and without classes.json the directory does not read as a dataset.
    assert os.listdir(tmp_path / "out") == ["train-00000-of-00002.array_record"]
    with pytest.raises(DataError, match="is missing"):
        ArrayRecordImageSource(tmp_path / "out")


def test_malformed_records_raise(tmp_path):
    out = tmp_path / "bad"
    out.mkdir()
    writer = ArrayRecordWriter(str(out / "x.array_record"), "group_size:1")
    writer.write(encode_record(b"img", 1, "ok.jpg"))
    writer.write(b"\xc1 not msgpack")
    writer.write(json.dumps({"image": "x"}).encode())
    writer.write(encode_record(b"img", 1, "ok.jpg")[:-3])  # truncated
    writer.write(encode_record(b"img", 7, "label out of range"))
    writer.close()
    (out / "classes.json").write_text(json.dumps({"class_names": ["a", "b"]}))
    source = ArrayRecordImageSource(out)
    assert source[0].label == 1
    for i in range(1, 5):
        with pytest.raises(DataError, match=f"x.array_record#{i}"):
            source[i]
    with pytest.raises(IndexError):
        source[5]


def test_pickled_sources_read(shards, tiny_tfds):
    out, _ = shards
    source = ArrayRecordImageSource(out)
    source[0]  # opens a reader, which must not travel
    copy = pickle.loads(pickle.dumps(source))
    assert [copy[i] for i in range(7)] == [source[i] for i in range(7)]
    tfds_source = TfdsImageSource(TinyImages.name, data_dir=tiny_tfds)
    tfds_source[0]
    tfds_copy = pickle.loads(pickle.dumps(tfds_source))
    assert tfds_copy._records is None
    assert [tfds_copy[i] for i in range(6)] == [tfds_source[i] for i in range(6)]


def test_array_record_errors(tmp_path, shards):
    with pytest.raises(DataError, match="does not exist"):
        ArrayRecordImageSource(tmp_path / "missing")
    with pytest.raises(DataError, match="no \\*.array_record shards"):
        ArrayRecordImageSource(tmp_path)
    with pytest.raises(DataError, match="no ArrayRecord shards match"):
        ArrayRecordImageSource(str(tmp_path / "*.array_record"))
    out, _ = shards
    (out / "classes.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read"):
        ArrayRecordImageSource(out)
    (out / "classes.json").write_text(json.dumps({"class_names": []}))
    with pytest.raises(DataError, match="no valid \"class_names\""):
        ArrayRecordImageSource(out)
    (out / "classes.json").write_text(json.dumps({"class_names": CLASSES, "num_records": 9}))
    with pytest.raises(DataError, match="holds 7 records in 3 shards"):
        ArrayRecordImageSource(out)
    os.remove(out / "classes.json")
    with pytest.raises(DataError, match="classes.json' is missing"):
        ArrayRecordImageSource(out)


def test_urls_are_refused_not_written_as_local_folders(tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL taken as a path would become the folder ./gs:/...
    with pytest.raises(DataError, match="is a URL.*mount"):
        write_array_record_shards(ImageFolderSource(tree), "gs://bucket/imagenet", num_shards=1)
    assert not (tmp_path / "gs:").exists()
    for read in (ArrayRecordImageSource, ImageFolderSource,
                 lambda p: TfdsImageSource("imagenet2012", data_dir=p)):
        with pytest.raises(DataError, match="is a URL"):
            read("gs://bucket/imagenet")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "launch.data.array_record", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_cli_writes_and_refuses_overwrite(tree, tmp_path):
    out = tmp_path / "cli"
    args = ["--input", str(tree), "--output", str(out), "--num_shards", "2", "--workers", "2"]
    done = _cli(*args)
    assert done.returncode == 0, done.stderr
    assert len(ArrayRecordImageSource(out)) == 7
    again = _cli(*args)
    assert again.returncode != 0
    assert "Traceback" not in again.stderr
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--overwrite" in errors[0]
    missing = _cli("--input", str(tmp_path / "nope"), "--output", str(out))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "is not a directory" in missing.stderr


# A tiny tfds dataset with ImageNet's features, built without TensorFlow: images go in as
# encoded bytes (encoding numpy arrays would need TF).
class TinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=CLASSES),
            "file_name": tfds.features.Text(),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(6):
            yield i, {"image": _encoded(30 * i, "JPEG"), "label": i % 3,
                      "file_name": f"img{i}.jpg"}


@pytest.fixture
def tiny_tfds(tmp_path):
    tfds.disable_progress_bar()
    TinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    return tmp_path


def test_tfds_source_reads_encoded_bytes(tiny_tfds):
    source = TfdsImageSource(TinyImages.name, data_dir=tiny_tfds, split="train")
    assert len(source) == 6
    assert source.num_classes == 3 and source.class_names == CLASSES
    seen = {}
    for i in range(6):
        example = source[i]
        k = int(example.name[3])  # "img<k>.jpg"; tfds shuffles the order
        assert example.data == _encoded(30 * k, "JPEG")
        assert example.label == k % 3
        seen[k] = example
    assert sorted(seen) == list(range(6))
    assert source.describe(2) == f"{TinyImages.name}/train#2"
    assert len(TfdsImageSource(TinyImages.name, data_dir=tiny_tfds, split="train[:2]")) == 2
    assert "tensorflow" not in sys.modules


def test_tfds_errors(tmp_path, tiny_tfds):
    with pytest.raises(DataError, match="does not exist"):
        TfdsImageSource("imagenet2012", data_dir=tmp_path / "missing")
    with pytest.raises(DataError, match="not prepared"):
        TfdsImageSource("imagenet2012", data_dir=tmp_path)
    with pytest.raises(DataError, match="no dataset named"):
        TfdsImageSource("no_such_dataset_here", data_dir=tmp_path)
    with pytest.raises(DataError, match="split 'validation'"):
        TfdsImageSource(TinyImages.name, data_dir=tiny_tfds, split="validation")
    # Pretend it was prepared as tfrecord (writing real tfrecords would need TensorFlow).
    info_path = tiny_tfds / TinyImages.name / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    with pytest.raises(DataError, match='prepared as tfrecord.*file_format="array_record"'):
        TfdsImageSource(TinyImages.name, data_dir=tiny_tfds)
