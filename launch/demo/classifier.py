"""The demo's judge: `eval_jax.classifier.SmallClassifier` trained on held-out shapes.

It sees only its own procedural images (another seed than the generative models' data), so
its verdict on samples is independent of everything it scores. Its params are saved as an
orbax directory and reused on a rerun.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from eval_jax.classifier import SmallClassifier
from launch import params_io


def load_folder(root: str) -> tuple[np.ndarray, np.ndarray]:
    """A class-folder tree of PNGs -> (uint8 images (N, H, W, 3), int32 labels)."""
    from launch.data.preprocess import decode_rgb
    from launch.data.sources import ImageFolderSource

    source = ImageFolderSource(root)
    images, labels = [], []
    for i in range(len(source)):
        example = source[i]
        images.append(decode_rgb(example.data))
        labels.append(example.label)
    return np.stack(images), np.asarray(labels, np.int32)


def _augment(rng: jax.Array, images: jax.Array) -> jax.Array:
    """Random horizontal flips and shifts of up to 2 pixels (wrap-around)."""
    k_flip, k_shift = jax.random.split(rng)
    flip = jax.random.bernoulli(k_flip, 0.5, (images.shape[0], 1, 1, 1))
    images = jnp.where(flip, images[:, :, ::-1], images)
    dy, dx = jax.random.randint(k_shift, (2,), -2, 3)
    return jnp.roll(images, (dy, dx), axis=(1, 2))


def train_classifier(images: np.ndarray, labels: np.ndarray, *, num_classes: int, steps: int,
                     batch_size: int = 64, lr: float = 2e-3, seed: int = 0):
    """Adam on cross-entropy; returns (model, params)."""
    model = SmallClassifier(num_classes=num_classes)
    rng = jax.random.key(seed)
    params = model.init(rng, jnp.zeros((1, *images.shape[1:]), jnp.uint8))["params"]
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, x, y, rng):
        def loss_fn(p):
            logits = model.apply({"params": p}, _augment(rng, x))["logits"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    data_rng = np.random.default_rng(seed)
    for i in range(steps):
        idx = data_rng.integers(0, len(images), batch_size)
        params, opt_state, loss = step(params, opt_state, images[idx], labels[idx],
                                       jax.random.fold_in(rng, i))
        if (i + 1) % max(1, steps // 4) == 0:
            logging.info("classifier step %d/%d: loss %.4f", i + 1, steps, float(loss))
    return model, params


def classifier_for(workdir: str, images: np.ndarray, labels: np.ndarray, *, num_classes: int,
                   steps: int, seed: int = 0):
    """The trained classifier saved in `workdir/params`, trained first if absent."""
    model = SmallClassifier(num_classes=num_classes)
    path = os.path.join(workdir, "params")
    if os.path.isdir(path):
        return model, params_io.restore_params(path, None)
    _, params = train_classifier(images, labels, num_classes=num_classes, steps=steps, seed=seed)
    params_io.save_params(path, params)
    return model, params


def accuracy(model, params, images: np.ndarray, labels: np.ndarray) -> float:
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x)["logits"])(params, images)
    return float(np.mean(np.asarray(logits).argmax(-1) == labels))
