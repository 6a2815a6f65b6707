"""Plain ArrayRecord shards of (encoded image, label): the format, a reader and a writer.

Format (one directory per split):

    OUT_DIR/train-00000-of-01024.array_record   # ArrayRecord files written with "group_size:1"
    ...                                          # (one record per group: fast random access)
    OUT_DIR/classes.json                         # written last: its presence marks a complete set

Each record is a msgpack map (`msgpack.packb(..., use_bin_type=True)`):

    {"image": <bytes: the original image file as-is, JPEG/PNG/...>,
     "label": <int: class index, 0 <= label < len(class_names)>,
     "name":  <str: the file's path relative to the input root, e.g. "n01440764/x.JPEG">}

Records follow the source's order (classes sorted as torchvision's ImageFolder, files sorted),
split into contiguous shards. `classes.json` holds
`{"class_names": [...], "num_records": N, "format": "msgpack {image,label,name}"}`; other tools
writing shards only need to write `class_names`.

Write shards from a class-folder tree (ImageNet's train/<wnid>/*.JPEG):

    python -m launch.data.array_record --input IMAGENET/train --output OUT_DIR \
        [--num_shards 1024] [--workers 8] [--overwrite]

Read them with `ArrayRecordImageSource(OUT_DIR)` (or config.data.source = "array_record").
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import itertools
import json
import os
import threading
from concurrent import futures

import msgpack
from absl import app, flags, logging
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from tqdm import tqdm

from launch.data.sources import (
    DataError,
    ImageFolderSource,
    ImageSource,
    RawExample,
    reject_url,
)

CLASSES_FILE = "classes.json"
SHARD_SUFFIX = ".array_record"
RECORD_FORMAT = "msgpack {image,label,name}"


def encode_record(data: bytes, label: int, name: str) -> bytes:
    return msgpack.packb({"image": data, "label": label, "name": name}, use_bin_type=True)


def decode_record(record: bytes) -> tuple[bytes, int, str]:
    """(image bytes, label, name) of one record; raises ValueError when it is malformed."""
    try:
        value = msgpack.unpackb(record, raw=False)
    except Exception as e:  # msgpack raises several unrelated types for garbage input
        raise ValueError(f"not a msgpack record ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict) or not {"image", "label", "name"} <= value.keys():
        raise ValueError("record is not a msgpack map with keys image, label, name")
    data, label, name = value["image"], value["label"], value["name"]
    # bool is an int subclass: reject it so a wrong writer is noticed.
    if not isinstance(data, bytes) or type(label) is not int or not isinstance(name, str):
        raise ValueError("record fields have wrong types (want image: bytes, label: int, "
                         "name: str)")
    return data, label, name


@dataclasses.dataclass(frozen=True)
class _Shard:
    """A whole shard, in the shape of array_record's `FileInstruction` protocol: passing counts
    we already know spares the data source from opening every file a second time."""

    filename: str
    skip: int
    take: int
    examples_in_shard: int


def _count_records(path: str) -> int:
    reader = ArrayRecordReader(path)
    try:
        return reader.num_records()
    finally:
        reader.close()


def _find_shards(path: str) -> list[str]:
    reject_url(path, "ArrayRecord path")
    if any(c in path for c in "*?["):
        shards = sorted(p for p in glob.glob(path) if os.path.isfile(p))
        if not shards:
            raise DataError(f"no ArrayRecord shards match {path!r} (config.data.path)")
        return shards
    if not os.path.exists(path):
        raise DataError(f"ArrayRecord path {path!r} does not exist (config.data.path)")
    if os.path.isfile(path):
        return [path]
    shards = sorted(glob.glob(os.path.join(glob.escape(path), "*" + SHARD_SUFFIX)))
    if not shards:
        raise DataError(f"no *{SHARD_SUFFIX} shards in {path!r}; write them with "
                        "python -m launch.data.array_record --input ... --output ...")
    return shards


def _read_class_names(classes_path: str) -> tuple[list[str], int | None]:
    if not os.path.isfile(classes_path):
        raise DataError(
            f"{classes_path!r} is missing: the shards need this sidecar with the class names. "
            "python -m launch.data.array_record writes it after the last shard (a missing file "
            "can mean an interrupted run); shards from other tools need "
            '{"class_names": ["<class 0>", ...]} written there by hand')
    try:
        with open(classes_path) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {classes_path!r}: {e}") from None
    names = info.get("class_names") if isinstance(info, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{classes_path!r} has no valid \"class_names\" (a non-empty list of "
                        "strings)")
    return names, info.get("num_records")


class ArrayRecordImageSource(ImageSource):
    """Reads shards in the format above. `path`: a directory of `*.array_record` shards, a glob
    pattern, or one shard file; `classes.json` is read next to the (first) shard."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        self.path = path
        self.shards = _find_shards(path)
        classes_path = os.path.join(os.path.dirname(self.shards[0]), CLASSES_FILE)
        self.class_names, expected = _read_class_names(classes_path)
        self.num_classes = len(self.class_names)
        try:
            with futures.ThreadPoolExecutor(min(16, len(self.shards))) as pool:
                counts = list(pool.map(_count_records, self.shards))
        except Exception as e:  # the C++ reader's error names the file
            raise DataError(f"cannot open ArrayRecord shards at {path!r}: {e}") from None
        # A whole directory must match the writer's count: extra or missing shards mean a mix
        # of runs or a broken copy.
        if os.path.isdir(path) and expected is not None and sum(counts) != expected:
            raise DataError(f"{path!r} holds {sum(counts)} records in {len(counts)} shards but "
                            f"{classes_path} says {expected}: rewrite it with --overwrite")
        instructions = [_Shard(p, 0, n, n) for p, n in zip(self.shards, counts)]
        # The source grain.sources.ArrayRecordDataSource wraps (without importing grain, which
        # takes a second): it opens readers lazily and drops them when pickled, so each grain
        # worker process opens its own.
        self._records = ArrayRecordDataSource(instructions)
        self._ends = list(itertools.accumulate(counts))  # to map index -> shard

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, index: int) -> RawExample:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        record = self._records[index]
        try:
            data, label, name = decode_record(record)
        except ValueError as e:
            raise DataError(f"malformed record {self.describe(index)}: {e}") from None
        if not 0 <= label < self.num_classes:
            raise DataError(f"record {self.describe(index)} has label {label}, outside "
                            f"[0, {self.num_classes})")
        return RawExample(data, label, name)

    def describe(self, index: int) -> str:
        shard = bisect.bisect_right(self._ends, index)
        start = self._ends[shard - 1] if shard else 0
        return f"{self.shards[shard]}#{index - start}"


def _record_name(source: ImageSource, example: RawExample) -> str:
    if isinstance(source, ImageFolderSource):
        return os.path.relpath(example.name, source.root)
    return example.name


def write_array_record_shards(source: ImageSource, output_dir: str | os.PathLike,
                              num_shards: int, *, workers: int = 1, overwrite: bool = False,
                              prefix: str = "train") -> list[str]:
    """Writes `source` into `num_shards` contiguous shards + classes.json; returns shard paths.

    Raises DataError when `output_dir` already holds shards (unless `overwrite`, which first
    deletes them). Each shard is written under a temporary name and renamed when complete.
    """
    output_dir = os.fspath(output_dir)
    reject_url(output_dir, "output directory")
    if num_shards < 1:
        raise DataError(f"num_shards must be >= 1, got {num_shards}")
    if not source.class_names:
        raise DataError("the source has no class names to write to classes.json")
    total = len(source)
    if total == 0:
        raise DataError("the source has no records to write")
    if num_shards > total:
        logging.warning("only %d records: writing %d shards instead of %d", total, total,
                        num_shards)
        num_shards = total
    os.makedirs(output_dir, exist_ok=True)
    existing = sorted(glob.glob(os.path.join(glob.escape(output_dir), "*" + SHARD_SUFFIX)))
    if existing and not overwrite:
        raise DataError(f"{output_dir!r} already holds {len(existing)} shards; pass "
                        "--overwrite to replace them")
    # Delete classes.json first: until the new set is complete the directory must not read as
    # a complete one.
    classes_path = os.path.join(output_dir, CLASSES_FILE)
    for stale in [classes_path, *existing]:
        if os.path.exists(stale):
            os.remove(stale)

    paths = [os.path.join(output_dir, f"{prefix}-{k:05d}-of-{num_shards:05d}{SHARD_SUFFIX}")
             for k in range(num_shards)]
    progress = tqdm(total=total, unit="img", desc=f"writing {output_dir}")
    lock = threading.Lock()

    def write_shard(k: int) -> None:
        path = paths[k]
        tmp_path = os.path.join(output_dir, f".{os.path.basename(path)}.tmp")
        writer = ArrayRecordWriter(tmp_path, "group_size:1")
        try:
            for index in range(k * total // num_shards, (k + 1) * total // num_shards):
                example = source[index]
                writer.write(encode_record(example.data, example.label,
                                           _record_name(source, example)))
                with lock:
                    progress.update(1)
            writer.close()
            os.replace(tmp_path, path)
        except BaseException:
            if writer.is_open():
                writer.close()
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
            raise

    with progress, futures.ThreadPoolExecutor(max(1, workers)) as pool:
        jobs = [pool.submit(write_shard, k) for k in range(num_shards)]
        try:
            for job in jobs:
                job.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # fail now, not after writing every other shard
            raise
    info = {"class_names": list(source.class_names), "num_records": total,
            "format": RECORD_FORMAT}
    with open(classes_path + ".tmp", "w") as f:
        json.dump(info, f, indent=1)
    os.replace(classes_path + ".tmp", classes_path)
    return paths


def _define_flags() -> None:
    # Only when run as a script: at import time these names would clash with other tools' flags.
    flags.DEFINE_string("input", None, "Class-folder tree: INPUT/<class>/<image>.", required=True)
    flags.DEFINE_string("output", None, "Directory for the shards and classes.json.",
                        required=True)
    flags.DEFINE_integer("num_shards", 1024, "Number of shards.", lower_bound=1)
    flags.DEFINE_integer("workers", 8, "Shards written in parallel (threads).", lower_bound=1)
    flags.DEFINE_string("prefix", "train", "Shard file name prefix.")
    flags.DEFINE_bool("overwrite", False, "Replace shards already in --output.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    cfg = flags.FLAGS
    if not os.path.isdir(cfg.input):
        raise DataError(f"--input {cfg.input!r} is not a directory of class folders")
    source = ImageFolderSource(cfg.input)
    paths = write_array_record_shards(source, cfg.output, cfg.num_shards, workers=cfg.workers,
                                      overwrite=cfg.overwrite, prefix=cfg.prefix)
    print(f"wrote {len(source)} records of {source.num_classes} classes into {len(paths)} "
          f"shards in {cfg.output}")


if __name__ == "__main__":
    from launch import cli

    _define_flags()
    cli.run(main)
