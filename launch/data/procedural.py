"""A procedural, download-free, class-conditional image dataset written as a class-folder tree.

Ten classes that differ in shape and colour (red disc, blue square, green triangle, ...), each
image with a random position, scale, rotation and dark background. The tree has ImageNet's
ImageFolder layout, so any code that reads `train/<wnid>/*.JPEG` reads it unchanged:

    root/00_red_disc/00_red_disc_00000.png, ..., root/09_pink_heart/09_pink_heart_00299.png

    python -m launch.data.procedural --out data/shapes32 --image_size 32 --images_per_class 300
    python -m launch.data.procedural --out data/shapes32 --image_size 32 --grid shapes32.png

The same arguments give byte-identical files. `root/.complete` (JSON of the arguments) is written
last, so a tree without it is a partial write; `ensure_shapes_dataset` rewrites such a tree.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np
from absl import flags, logging
from PIL import Image, ImageDraw

from launch.data.sources import DataError

MARKER = ".complete"
SUPERSAMPLE = 4  # draw at 4x the size, then downsample with LANCZOS: anti-aliased edges
_VERSION = 1  # bump when the images change, so an old tree no longer counts as complete


def _circle(radius: float = 1.0, centre: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, 64, endpoint=False)
    return np.stack([centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t)], axis=1)


def _star(points: int, outer: float, inner: float) -> np.ndarray:
    t = np.arange(2 * points) * np.pi / points - np.pi / 2  # first tip points up
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, 96, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y - 2.5], axis=1) / 15.0  # centred, about radius 1


def _cross(arm: float = 0.32) -> np.ndarray:
    a = arm
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1),
                     (-a, a), (-1, a), (-1, -a), (-a, -a)], dtype=np.float64)


def _stripes() -> list[tuple[np.ndarray, bool]]:
    bars = [(-0.95, -0.5), (-0.22, 0.22), (0.5, 0.95)]
    return [(np.array([(-1, y0), (1, y0), (1, y1), (-1, y1)], dtype=np.float64), True)
            for y0, y1 in bars]


# Each class: folder name, RGB colour, largest rotation in degrees, and its parts in unit
# coordinates (about radius 1, y down): polygons drawn in order, True paints, False erases.
# Stripes, diamond and heart rotate only a little so they still read as "horizontal",
# "diamond, not square" and "heart".
_CLASSES: tuple[tuple[str, tuple[int, int, int], float, list[tuple[np.ndarray, bool]]], ...] = (
    ("00_red_disc", (235, 35, 35), 180, [(_circle(), True)]),
    ("01_blue_square", (40, 100, 255), 180,
     [(np.array([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]), True)]),
    ("02_green_triangle", (40, 205, 60), 180, [(_star(3, 1.15, 0.575), True)]),
    ("03_yellow_star", (255, 225, 30), 180, [(_star(5, 1.25, 0.5), True)]),
    ("04_magenta_cross", (240, 20, 240), 180, [(_cross(), True)]),
    ("05_cyan_ring", (20, 230, 240), 180, [(_circle(), True), (_circle(0.55), False)]),
    ("06_orange_stripes", (255, 140, 0), 20, _stripes()),
    ("07_purple_diamond", (150, 70, 225), 25,
     [(np.array([(0, -1.25), (0.72, 0), (0, 1.25), (-0.72, 0)], dtype=np.float64), True)]),
    ("08_white_crescent", (245, 245, 245), 180,
     [(_circle(), True), (_circle(0.82, (0.42, -0.1)), False)]),
    ("09_pink_heart", (255, 160, 195), 25, [(_heart(), True)]),
)
CLASS_NAMES: tuple[str, ...] = tuple(name for name, _, _, _ in _CLASSES)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A dark, muted two-colour gradient with light noise: every class colour stands out."""
    grey = rng.uniform(12, 60, size=(2, 1))
    ends = np.clip(grey + rng.uniform(-12, 12, size=(2, 3)), 0, 75)  # (2 ends, RGB)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (xs - 0.5) * np.cos(angle) + (ys - 0.5) * np.sin(angle) + 0.5
    t = np.clip(t, 0, 1)[..., None]
    noise = rng.normal(0, rng.uniform(0, 5), size=(size, size, 3))
    return ends[0] * (1 - t) + ends[1] * t + noise


def render_shape(class_index: int, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """One image of class `class_index`: uint8 (image_size, image_size, 3), drawn from `rng`."""
    if not 0 <= class_index < len(_CLASSES):
        raise ValueError(f"class_index must be in [0, {len(_CLASSES)}), got {class_index}")
    _, colour, max_degrees, parts = _CLASSES[class_index]
    background = _background(image_size, rng)
    rgb = np.clip(np.array(colour) + rng.integers(-15, 16, size=3), 0, 255)

    big = image_size * SUPERSAMPLE
    radius = rng.uniform(0.2, 0.34) * big
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    placed = [(points @ rotation.T * radius, paint) for points, paint in parts]
    # Place the painted bounding box uniformly inside the image: the shape is never cut off.
    painted = np.concatenate([points for points, paint in placed if paint])
    low, high = painted.min(axis=0), painted.max(axis=0)
    offset = rng.uniform(-low, big - high)

    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for points, paint in placed:
        draw.polygon([tuple(p) for p in points + offset], fill=255 if paint else 0)
    alpha = np.asarray(mask.resize((image_size, image_size), Image.Resampling.LANCZOS))
    alpha = alpha[..., None].astype(np.float64) / 255.0
    image = background * (1 - alpha) + rgb * alpha
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _arguments(image_size: int, images_per_class: int, seed: int, num_classes: int) -> dict:
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise DataError(f"num_classes must be in [1, {len(CLASS_NAMES)}], got {num_classes}")
    if image_size < 8 or images_per_class < 1 or seed < 0:
        raise DataError(f"need image_size >= 8, images_per_class >= 1 and seed >= 0, got "
                         f"{image_size}, {images_per_class} and {seed}")
    return {"image_size": image_size, "images_per_class": images_per_class, "seed": seed,
            "num_classes": num_classes, "version": _VERSION}


def _describe(arguments: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in arguments.items())


def _read_marker(root: str) -> dict | None:
    """The arguments of a complete tree at `root`; None when absent or unreadable (partial)."""
    try:
        with open(os.path.join(root, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _image_rng(seed: int, class_index: int, image_index: int) -> np.random.Generator:
    # Seeded per image: any image can be regenerated alone, in any order.
    return np.random.default_rng([seed, class_index, image_index])


def write_shapes_dataset(root: str | os.PathLike, image_size: int, images_per_class: int,
                         seed: int = 0, num_classes: int = 10) -> str:
    """Writes `root/<class>/<class>_<index:05d>.png`, then `root/.complete`; returns root."""
    root = os.fspath(root)
    arguments = _arguments(image_size, images_per_class, seed, num_classes)
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f"{root!r} is a file, expected a directory for the shapes dataset")
    os.makedirs(root, exist_ok=True)
    # Clear what an earlier (maybe interrupted) write left; other files in root are not ours.
    marker = os.path.join(root, MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    for name in CLASS_NAMES:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    for class_index, name in enumerate(CLASS_NAMES[:num_classes]):
        os.makedirs(os.path.join(root, name))
        for image_index in range(images_per_class):
            image = render_shape(class_index, image_size, _image_rng(seed, class_index,
                                                                     image_index))
            # PIL writes no time or text chunks into a PNG: the bytes depend on the pixels only.
            path = os.path.join(root, name, f"{name}_{image_index:05d}.png")
            Image.fromarray(image).save(path, format="PNG")
    with open(marker + ".tmp", "w") as f:
        json.dump(arguments, f)
    os.replace(marker + ".tmp", marker)
    return root


def ensure_shapes_dataset(root: str | os.PathLike, image_size: int, images_per_class: int,
                          seed: int = 0, num_classes: int = 10) -> str:
    """Writes the tree unless `root` already holds a complete one with the same arguments."""
    root = os.fspath(root)
    arguments = _arguments(image_size, images_per_class, seed, num_classes)
    found = _read_marker(root)
    if found == arguments:
        return root
    if found is not None:
        raise DataError(f"{root!r} holds a shapes dataset written with ({_describe(found)}), "
                         f"not the requested ({_describe(arguments)}); use another directory "
                         "or delete this one")
    start = time.perf_counter()
    write_shapes_dataset(root, image_size, images_per_class, seed, num_classes)
    logging.info("wrote %d shapes images to %s in %.2f s", num_classes * images_per_class, root,
                 time.perf_counter() - start)
    return root


def shapes_grid(image_size: int, seed: int = 0, num_classes: int = 10, columns: int = 8,
                gap: int = 2) -> np.ndarray:
    """The first `columns` images of each class (the ones in the tree), one row per class."""
    step = image_size + gap
    grid = np.full((num_classes * step - gap, columns * step - gap, 3), 255, dtype=np.uint8)
    for class_index in range(num_classes):
        for image_index in range(columns):
            image = render_shape(class_index, image_size, _image_rng(seed, class_index,
                                                                     image_index))
            y, x = class_index * step, image_index * step
            grid[y:y + image_size, x:x + image_size] = image
    return grid


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    arguments = _arguments(f.image_size, f.images_per_class, f.seed, f.num_classes)
    done_before = _read_marker(f.out) == arguments
    start = time.perf_counter()
    ensure_shapes_dataset(f.out, f.image_size, f.images_per_class, f.seed, f.num_classes)
    elapsed = time.perf_counter() - start
    if f.grid:
        grid = shapes_grid(f.image_size, f.seed, f.num_classes)
        Image.fromarray(grid).save(f.grid, format="PNG")
    state = "already complete" if done_before else f"written in {elapsed:.2f} s"
    print(f"{f.num_classes * f.images_per_class} images ({f.num_classes} classes x "
          f"{f.images_per_class}, {f.image_size}x{f.image_size}) in {f.out}: {state}")


if __name__ == "__main__":
    # Flags only when run as a program, so importing this module defines no global flags.
    flags.DEFINE_string("out", None, "Root folder of the class-folder tree.", required=True)
    flags.DEFINE_integer("image_size", 32, "Image height and width in pixels.", lower_bound=8)
    flags.DEFINE_integer("images_per_class", 300, "Images per class.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed; the same arguments give byte-identical files.")
    flags.DEFINE_integer("num_classes", 10, f"Number of classes, at most {len(_CLASSES)}.",
                         lower_bound=1, upper_bound=len(_CLASSES))
    flags.DEFINE_string("grid", None, "Also write a PNG grid (a row per class, 8 columns).")
    from launch import cli

    cli.run(_main)
