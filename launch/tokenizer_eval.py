"""Tokenizer evaluation as a library: rFID, PSNR, SSIM and LPIPS of VA-VAE reconstructions.

As upstream's evaluate_tokenizer.py: validation images resized (shorter side, bilinear with
antialiasing) and center-cropped to `image_size`, scaled to [-1, 1]; each is encoded to a
posterior *sample* (noise keyed by the image's index) and decoded. PSNR is measured on the 8-bit
images (upstream's PNGs), SSIM and LPIPS on the float images (reconstructions unclamped), rFID
between the features of the originals and of the reconstructions. `python -m
launch.evaluate_tokenizer` is the command; the demo calls `evaluate_tokenizer`.

One difference: the resize happens on the uint8 image with PIL (then the model input is that
8-bit image), where upstream resizes torchvision float tensors; the inputs differ by less than
half an 8-bit step.
"""

from __future__ import annotations

import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from eval_jax import metrics, reconstruction
from launch import cli, sharding
from launch.data.preprocess import decode_rgb, to_model_range
from launch.data.sources import ImageSource


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision Resize(size) (shorter side; bilinear, antialiased) + CenterCrop(size)."""
    from PIL import Image

    h, w = image.shape[:2]
    if (h, w) != (size, size):
        if h <= w:
            new_h, new_w = size, int(size * w / h)
        else:
            new_h, new_w = int(size * h / w), size
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    h, w = image.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return np.ascontiguousarray(image[top:top + size, left:left + size])


class LoadForEvaluation(grain.transforms.Map):
    """Index -> {'image' uint8 (S, S, 3), 'index', 'ok'} (ok False: undecodable, skipped)."""

    def __init__(self, source: ImageSource, image_size: int):
        self.source, self.image_size = source, image_size

    def map(self, index: int) -> dict:
        try:
            image = resize_center_crop(decode_rgb(self.source[int(index)].data), self.image_size)
            ok = True
        except Exception:  # noqa: BLE001 (an undecodable image is skipped and counted)
            image, ok = np.zeros((self.image_size, self.image_size, 3), np.uint8), False
        return {"image": image, "index": np.int64(index), "ok": np.bool_(ok)}


def make_reconstruct(autoencoder, lpips, mesh, seed: int):
    """Jitted (ae_params, lpips_params, images uint8 (B,S,S,3), indices (B,)) ->
    (reconstructions uint8, ssim (B,), lpips (B,)), batch-sharded over `mesh`."""
    base = jax.random.key(seed)

    def reconstruct(ae_params, lpips_params, images, indices):
        x = to_model_range(images, "torchvision")
        posterior = autoencoder.apply({"params": ae_params}, x, method=autoencoder.encode)
        eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i),
                                                   posterior.mean.shape[1:]))(indices)
        recon = autoencoder.apply({"params": ae_params}, posterior.sample_with_eps(eps),
                                  method=autoencoder.decode).astype(jnp.float32)
        recon_u8 = jnp.clip(127.5 * recon + 128.0, 0, 255).astype(jnp.uint8)
        if lpips is None:
            distance = jnp.zeros(x.shape[0])
        else:
            distance = lpips.apply({"params": lpips_params}, recon, x).reshape(-1)
        return recon_u8, reconstruction.ssim(recon, x), distance

    batch = sharding.batch_sharding(mesh, 4)
    vector = sharding.batch_sharding(mesh, 1)
    return jax.jit(reconstruct, out_shardings=(batch, vector, vector))


def evaluate_tokenizer(source: ImageSource, autoencoder, ae_params, lpips, lpips_params, *,
                       image_size: int, batch_size: int, mesh, num_images: int = 0,
                       extract=None, seed: int = 0, worker_count: int = 0,
                       keep: int = 0, progress: bool = True) -> dict:
    """Reconstruction metrics over the first `num_images` (0: all) of `source`.

    `extract` is a `launch.evaluation.FeatureExtractor` for rFID (None: no rFID); `lpips`
    None leaves LPIPS out. Returns
    {'rfid'?, 'psnr', 'ssim', 'lpips', 'num_images', 'num_skipped', 'seconds'} and, when
    `keep` > 0, the first `keep` originals / reconstructions under 'examples'."""
    from tqdm import tqdm

    n = min(num_images or len(source), len(source))
    devices = mesh.devices.size
    batch_size = -(-batch_size // devices) * devices
    dataset = (grain.MapDataset.range(n).map(LoadForEvaluation(source, image_size))
               .batch(batch_size, drop_remainder=False).to_iter_dataset())
    if worker_count:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    run = make_reconstruct(autoencoder, lpips, mesh, seed)
    in_batch, in_vector = sharding.batch_sharding(mesh, 4), sharding.batch_sharding(mesh, 1)
    ae_params = jax.device_put(ae_params, sharding.replicated(mesh))
    if lpips is not None:
        lpips_params = jax.device_put(lpips_params, sharding.replicated(mesh))
    psnr, ssim, lpips_d, originals, recons = [], [], [], [], []
    skipped, start = 0, time.perf_counter()
    bar = tqdm(total=n, unit="img", disable=not progress, dynamic_ncols=True)
    with sharding.mesh_context(mesh):
        for batch in dataset:
            ok = batch["ok"]
            m = len(ok)
            images, indices = batch["image"], batch["index"]
            if m < batch_size:  # pad to the compiled shape; padding rows are dropped below
                pad = batch_size - m
                images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
                indices = np.concatenate([indices, np.repeat(indices[-1:], pad)])
            recon, s, d = run(ae_params, lpips_params, jax.device_put(images, in_batch),
                              jax.device_put(indices.astype(np.int32), in_vector))
            recon = np.asarray(recon)[:m][ok]
            kept = batch["image"][ok]
            skipped += int(m - ok.sum())
            psnr.append(reconstruction.psnr_uint8(recon, kept))
            ssim.append(np.asarray(s)[:m][ok])
            lpips_d.append(np.asarray(d)[:m][ok])
            if extract is not None or sum(map(len, originals)) < keep:
                originals.append(kept)
                recons.append(recon)
            bar.update(m)
    bar.close()
    if skipped:
        logging.warning("%d of %d images could not be decoded and were skipped", skipped, n)
    result = {"psnr": float(np.mean(np.concatenate(psnr))),
              "ssim": float(np.mean(np.concatenate(ssim))),
              "num_images": n - skipped, "num_skipped": skipped}
    if lpips is not None:
        result["lpips"] = float(np.mean(np.concatenate(lpips_d)))
    if extract is not None:
        real = extract(np.concatenate(originals))["pool"]
        fake = extract(np.concatenate(recons))["pool"]
        result["rfid"] = metrics.frechet_distance(*metrics.feature_statistics(fake),
                                                  *metrics.feature_statistics(real))
    result["seconds"] = round(time.perf_counter() - start, 2)
    if keep:
        result["examples"] = (np.concatenate(originals)[:keep], np.concatenate(recons)[:keep])
    return result


def load_lpips(config):
    """(LPIPS module, params): the files of `config.lpips`, or random for the tiny config."""
    from torchport import load_state_dict
    from vavae_jax.lpips import LPIPS, params_from_torchvision

    module = LPIPS()
    vgg, heads = config.lpips.get("vgg16", ""), config.lpips.get("heads", "")
    if vgg and heads:
        for path in (vgg, heads):
            if not os.path.exists(path):
                raise cli.UserError(f"LPIPS weights {path!r} do not exist")
        return module, params_from_torchvision(load_state_dict(vgg), load_state_dict(heads),
                                               sources=(vgg, heads))
    if not config.get("random_weights_ok", False):
        raise cli.UserError("config.lpips.vgg16 / config.lpips.heads are empty: LPIPS needs "
                            "vgg16-397923af.pth and LPIPS vgg.pth (see README)")
    logging.warning("LPIPS with RANDOM weights (tiny config without config.lpips files)")
    x = jnp.zeros((1, 32, 32, 3))
    return module, module.init(jax.random.key(config.seed), x, x)["params"]
