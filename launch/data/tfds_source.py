"""Random access to a TFDS image dataset prepared in the `array_record` file format, without TF.

    source = TfdsImageSource("imagenet2012", data_dir="~/tensorflow_datasets", split="train")
    source[0]   # RawExample(<JPEG bytes>, label, "n01440764_10026.JPEG")

Reading needs no TensorFlow: `builder.as_data_source` reads the ArrayRecord files and parses
tfds' example protos in numpy, and `tfds.decode.SkipDecoding()` on the image keeps the encoded
bytes (decoding happens later in the pipeline, like the other sources).

Preparing does need TensorFlow (tfds' ImageNet builder calls `tf.io.gfile`), and only the
array_record format gives random access (tfrecord has none). Prepare once, in a separate
environment with tensorflow-cpu, then train here:

    pip install tensorflow-cpu tensorflow-datasets      # a separate "prep" venv
    python -c "import tensorflow_datasets as tfds; tfds.builder('imagenet2012', \
        data_dir=DATA_DIR, file_format='array_record').download_and_prepare(download_config=\
        tfds.download.DownloadConfig(manual_dir=DIR_WITH_ILSVRC2012_TARS))"

`name` may carry a version ("imagenet2012:5.1.0"); `split` accepts tfds' split syntax.
"""

from __future__ import annotations

import os

from launch.data.sources import DataError, ImageSource, RawExample, reject_url

_PREPARE_HINT = ("prepare it with file_format=\"array_record\" in a separate environment with "
                 "tensorflow-cpu (see launch/data/tfds_source.py)")


def _builder(name: str, data_dir: str):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        # tfds' own message lists every dataset in its catalog: too long to be read.
        raise DataError(f"tfds has no dataset named {name!r} (config.data.tfds_name)") from None


class TfdsImageSource(ImageSource):
    """Encoded image bytes + labels from `data_dir/<name>/<version>/*.array_record-*`.

    The dataset needs an `image` (tfds Image) and a `label` (ClassLabel) feature; the optional
    `file_name` feature (ImageNet has one) names the items in logs.
    """

    def __init__(self, name: str = "imagenet2012", data_dir: str | os.PathLike | None = None,
                 split: str = "train"):
        from tensorflow_datasets.core.file_adapters import FileFormat

        if data_dir is None:
            raise DataError("TfdsImageSource needs data_dir: the tfds data directory holding "
                            f"{name}/<version>/ (config.data.path)")
        data_dir = os.path.expanduser(os.fspath(data_dir))
        reject_url(data_dir, "tfds data_dir")
        if not os.path.isdir(data_dir):
            raise DataError(f"tfds data_dir {data_dir!r} does not exist (config.data.path)")
        self.name, self.data_dir, self.split = name, data_dir, split

        builder = _builder(name, data_dir)
        if not builder.is_prepared():
            raise DataError(f"tfds dataset {name!r} is not prepared in {data_dir!r} (looked for "
                            f"{builder.data_path}): {_PREPARE_HINT}")
        info = builder.info
        if FileFormat.ARRAY_RECORD not in info.available_file_formats():
            formats = ", ".join(sorted(f.value for f in info.available_file_formats()))
            raise DataError(f"tfds dataset {name!r} at {builder.data_path} is prepared as "
                            f"{formats or 'an unknown format'}, which has no random access: "
                            f"re-{_PREPARE_HINT}")
        features = info.features
        if "image" not in features or "label" not in features:
            raise DataError(f"tfds dataset {name!r} has features {list(features)}; "
                            "TfdsImageSource needs 'image' and 'label'")
        label = features["label"]
        if not hasattr(label, "num_classes"):
            raise DataError(f"tfds dataset {name!r}: feature 'label' is not a ClassLabel")
        self.num_classes = int(label.num_classes)
        self.class_names = list(label.names)
        self._has_file_name = "file_name" in features
        self._records = self._open(builder)
        self._length = len(self._records)

    def _open(self, builder=None):
        import tensorflow_datasets as tfds

        builder = builder or _builder(self.name, self.data_dir)
        try:
            # SkipDecoding: tfds returns the image feature as the stored (encoded) bytes.
            return builder.as_data_source(split=self.split, file_format="array_record",
                                          decoders={"image": tfds.decode.SkipDecoding()})
        except ValueError as e:  # unknown split or bad split syntax
            raise DataError(f"tfds dataset {self.name!r}: split {self.split!r}: {e}") from None

    # Pickled without the open data source: each grain worker reopens it on first use.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_records"] = None
        return state

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> RawExample:
        if not 0 <= index < self._length:
            raise IndexError(f"record {index} out of range [0, {self._length})")
        if self._records is None:
            self._records = self._open()
        example = self._records[index]
        data = example["image"]
        if not isinstance(data, bytes):
            raise DataError(f"{self.describe(index)}: image is {type(data).__name__}, expected "
                            "encoded bytes")
        name = self.describe(index)
        if self._has_file_name:
            file_name = example["file_name"]
            name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
        return RawExample(data, int(example["label"]), name)

    def describe(self, index: int) -> str:
        return f"{self.name}/{self.split}#{index}"
