"""Random-access image sources: class-folder trees, ArrayRecord shards, tfds array_record.

Every source yields `RawExample`s (encoded image bytes, integer label, a name for logs) and is
picklable, so grain worker processes can read it: file handles are opened lazily per process.
Decoding happens later, in the pipeline, where a bad item is skipped and counted.

    source = open_image_source(config.data)      # dispatches on config.data.source
"""

from __future__ import annotations

import dataclasses
import os

# torchvision.datasets.folder.IMG_EXTENSIONS: what ImageFolder (upstream's loader) accepts,
# compared case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A user-facing data problem: wrong path, no classes, too many undecodable items, ..."""


def is_url(path: str) -> bool:
    """gs://..., s3://...: not a path. Everything here reads and writes through the file system,
    where such a name would not be found, or would be written as a local folder named 'gs:'."""
    return "://" in path


def reject_url(path: str, what: str) -> None:
    """A `DataError` for a URL (see `is_url`) given as data to read or shards to write."""
    if is_url(path):
        raise DataError(f"{what} {path!r} is a URL: data is read and written through the local "
                        "filesystem only; mount the bucket (e.g. gcsfuse) and pass the mount path")


@dataclasses.dataclass(frozen=True)
class RawExample:
    data: bytes  # the encoded image file (JPEG, PNG, ...)
    label: int
    name: str  # path or record id, for log lines and errors


class ImageSource:
    """Base class. Subclasses set `num_classes` and implement `__len__`, `__getitem__`."""

    num_classes: int
    class_names: list[str] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> RawExample:
        """May raise for a malformed record; the pipeline counts that item as bad."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """A name for item `index` (path or record id) without decoding it."""
        return f"record {index}"


def find_classes(root: str) -> list[str]:
    """Class folder names sorted as torchvision's `ImageFolder.find_classes` sorts them."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


class ImageFolderSource(ImageSource):
    """`root/<class>/<image>` trees (ImageNet's `train/<wnid>/*.JPEG`), labelled like ImageFolder.

    Classes are the sub-folders in sorted order (label = position); images are the files with
    an ImageFolder extension, walked recursively in sorted order. `exclude` drops file names
    (upstream's VA-VAE data list leaves out `n06596364_9591.JPEG`).
    """

    def __init__(self, root: str | os.PathLike, exclude: tuple[str, ...] = ()):
        root = os.fspath(root)
        reject_url(root, "image folder")
        if not os.path.exists(root):
            raise DataError(f"image folder {root!r} does not exist (config.data.path)")
        if not os.path.isdir(root):
            raise DataError(f"image folder {root!r} is a file, expected a directory of class "
                            "folders (config.data.path)")
        self.root = root
        self.class_names = find_classes(root)
        if not self.class_names:
            raise DataError(f"{root!r} has no class folders: expected {root}/<class>/<image> "
                            "as ImageNet's train/<wnid>/*.JPEG (config.data.path)")
        excluded = set(exclude)
        paths, labels = [], []
        for label, name in enumerate(self.class_names):
            class_dir = os.path.join(root, name)
            for dirpath, _, filenames in sorted(os.walk(class_dir, followlinks=True)):
                for filename in sorted(filenames):
                    if filename.lower().endswith(IMG_EXTENSIONS) and filename not in excluded:
                        paths.append(os.path.join(dirpath, filename))
                        labels.append(label)
        if not paths:
            raise DataError(f"{root!r} has {len(self.class_names)} class folders but no image "
                            f"files ({', '.join(IMG_EXTENSIONS)})")
        # torchvision's ImageFolder raises for a class without images (an interrupted copy or
        # extraction) rather than train with a class that never appears
        present = set(labels)
        empty = [name for label, name in enumerate(self.class_names) if label not in present]
        if empty:
            raise DataError(f"{root!r}: {len(empty)} of {len(self.class_names)} class folders "
                            f"hold no image files ({', '.join(IMG_EXTENSIONS)}): "
                            f"{', '.join(empty[:10])}{', ...' if len(empty) > 10 else ''}")
        self.num_classes = len(self.class_names)
        self._paths = paths
        self._labels = labels

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> RawExample:
        path = self._paths[index]
        with open(path, "rb") as f:
            return RawExample(f.read(), self._labels[index], path)

    def describe(self, index: int) -> str:
        return self._paths[index]

    def label(self, index: int) -> int:
        return self._labels[index]


def open_image_source(data) -> ImageSource:
    """The source named by `data.source` ('folder', 'array_record' or 'tfds') at `data.path`."""
    kind = data.source
    if kind == "folder":
        return ImageFolderSource(data.path, exclude=tuple(data.get("exclude", ())))
    if kind == "array_record":
        from launch.data.array_record import ArrayRecordImageSource

        return ArrayRecordImageSource(data.path)
    if kind == "tfds":
        from launch.data.tfds_source import TfdsImageSource

        return TfdsImageSource(data.get("tfds_name", "imagenet2012"), data_dir=data.path,
                               split=data.get("split", "train"))
    raise DataError(f"unknown config.data.source {kind!r}: folder, array_record, tfds "
                    "(latents are read by launch.data.latents)")
