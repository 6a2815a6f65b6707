"""The image pipeline: `config.data` -> global batches {'image': uint8, 'labels': int32}.

    it = make_image_iterator(config.data, global_batch_size=256, seed=config.seed,
                             num_classes=1000, mesh=mesh)
    batch = next(it)   # image (B, S, S, 3) uint8, labels (B,) int32, global jax.Arrays

Images stay uint8 up to the device; the step scales them with
`launch.data.preprocess.to_model_range` (upstream's exact [-1, 1] mapping).
"""

from __future__ import annotations

import numpy as np
from absl import logging

from launch.data.pipeline import UPSCALED_KEY, GlobalBatchIterator, make_global_iterator
from launch.data.preprocess import PREPROCESS_MODES, preprocess
from launch.data.sources import DataError, ImageSource, open_image_source


class LoadImage:
    """record -> {'image', 'labels', upscaled flag}; raises for an undecodable item."""

    def __init__(self, source: ImageSource, mode: str, image_size: int, flip_prob: float):
        if mode not in PREPROCESS_MODES:
            raise DataError(f"config.data.preprocess={mode!r}: expected one of "
                            f"{PREPROCESS_MODES}")
        self.source = source
        self.mode = mode
        self.image_size = image_size
        self.flip_prob = flip_prob

    def __call__(self, record: int, rng: np.random.Generator) -> dict:
        example = self.source[record]
        image, upscaled = preprocess(example.data, self.mode, self.image_size, rng)
        if self.flip_prob > 0 and rng.random() < self.flip_prob:
            image = image[:, ::-1]
        return {"image": np.ascontiguousarray(image), "labels": np.int32(example.label),
                UPSCALED_KEY: np.bool_(upscaled)}

    def why_bad(self, record: int) -> str:
        """Re-read a bad record in the main process to log its error (rare, so cheap)."""
        try:
            self(record, np.random.default_rng(0))
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {e}"
        return "decoded on retry"


def prepare_source(data) -> ImageSource:
    """Open `data`'s source; a procedural config writes its class-folder tree first (process
    0 writes, the others wait for it)."""
    if data.source == "folder" and data.get("procedural_images_per_class", 0) > 0:
        import jax

        from launch.data.procedural import ensure_shapes_dataset

        if jax.process_index() == 0:
            ensure_shapes_dataset(data.path, image_size=data.image_size,
                                  images_per_class=data.procedural_images_per_class)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"procedural data at {data.path}")
    return open_image_source(data)


def check_num_classes(source: ImageSource, num_classes: int | None, path: str) -> None:
    if num_classes is not None and source.num_classes != num_classes:
        raise DataError(f"{path} has {source.num_classes} classes but the model has "
                        f"num_classes={num_classes}")


def make_image_iterator(data, *, global_batch_size: int, seed: int,
                        num_classes: int | None = None, mesh=None, start_step: int = 0,
                        num_steps: int | None = None, process_index: int | None = None,
                        process_count: int | None = None,
                        source: ImageSource | None = None) -> GlobalBatchIterator:
    """Global batches of `data` (a `config.data` block) in a seeded, host-independent order.

    `process_index` / `process_count` default to JAX's; tests pass them to simulate hosts.
    """
    source = source or prepare_source(data)
    check_num_classes(source, num_classes, data.path)
    load = LoadImage(source, data.preprocess, data.image_size, data.flip_prob)
    iterator = make_global_iterator(
        data, load, num_records=len(source), describe=source.describe, reason=load.why_bad,
        global_batch_size=global_batch_size, seed=seed, shuffle=data.get("shuffle", True),
        mesh=mesh, start_step=start_step, num_steps=num_steps, process_index=process_index,
        process_count=process_count)
    logging.info("image data: %s (%s), %d images, %d classes, %d steps per epoch",
                 data.path, data.source, len(source), source.num_classes,
                 len(source) // global_batch_size)
    return iterator
