"""The demo's seven stages, each a call into the library a real run uses.

Every stage is idempotent: training resumes from its checkpoints (and returns at once when
finished), extraction and sampling skip their finished shards / chunks, the classifier and the
exported files are reused. A `Demo` holds the paths and the two configs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil

import numpy as np
from absl import logging

from launch.demo import classifier as judge

NUM_CLASSES = 10
GRID_COLUMNS = 8


@dataclasses.dataclass
class Sizes:
    """How much work each stage does (full demo vs the reduced CI run)."""

    images_per_class: int  # the generative models' training set
    heldout_per_class: int  # the judge's training set, and the real side of the FD
    vavae_steps: int
    dit_steps: int
    classifier_steps: int
    num_samples: int  # balanced over the classes; the grid shows the first of each class


FULL = Sizes(images_per_class=300, heldout_per_class=100, vavae_steps=800, dit_steps=2000,
             classifier_steps=400, num_samples=500)
QUICK = Sizes(images_per_class=16, heldout_per_class=8, vavae_steps=4, dit_steps=4,
              classifier_steps=4, num_samples=20)


@dataclasses.dataclass
class Demo:
    workdir: str
    sizes: Sizes
    dinov2: str = ""  # a real DINOv2 checkpoint for the VF loss (default: the random tiny ViT)

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    # -- configs ---------------------------------------------------------------------------

    def vavae_config(self):
        from configs.vavae import get_config

        config = get_config("demo")
        config.total_steps = self.sizes.vavae_steps
        config.data.path = self.path("data", "shapes32")
        config.data.procedural_images_per_class = self.sizes.images_per_class
        if self.dinov2:
            config.foundation.update(size="L", overrides={}, checkpoint=self.dinov2)
        return config

    def dit_config(self):
        from configs.lightningdit import get_config

        config = get_config("demo")
        config.total_steps = self.sizes.dit_steps
        config.data.path = self.path("latents")
        config.tokenizer.checkpoint = self.path("vavae")
        return config


# -- 1. data ------------------------------------------------------------------------------


def make_data(demo: Demo) -> dict:
    from launch.data.procedural import ensure_shapes_dataset

    s = demo.sizes
    ensure_shapes_dataset(demo.path("data", "shapes32"), 32, s.images_per_class, seed=0)
    ensure_shapes_dataset(demo.path("data", "heldout32"), 32, s.heldout_per_class, seed=1)
    return {"train_images": NUM_CLASSES * s.images_per_class,
            "heldout_images": NUM_CLASSES * s.heldout_per_class}


# -- 2. / 4. training ------------------------------------------------------------------------


def train_vavae(demo: Demo) -> dict:
    from launch.training.loop import train

    metrics = train(demo.vavae_config(), demo.path("vavae"))
    return {f"vavae_{k}": metrics[k] for k in ("rec_loss", "vf_loss", "kl_loss") if k in metrics}


def extract(demo: Demo) -> dict:
    from launch.data.extraction import extract_latents

    extract_latents(demo.vavae_config(), demo.path("latents"), demo.path("vavae"))
    return {}


def train_dit(demo: Demo) -> dict:
    from launch.training.loop import train

    metrics = train(demo.dit_config(), demo.path("dit"))
    return {f"dit_{k}": metrics[k] for k in ("loss", "mse") if k in metrics}


# -- 5. sampling ------------------------------------------------------------------------------


def sample(demo: Demo) -> dict:
    from launch.sampling import run_sampling

    n = demo.sizes.num_samples
    labels = list(range(NUM_CLASSES))  # cycled: sample i has class i % 10
    summary = run_sampling(demo.dit_config(), demo.path("samples"), checkpoint=demo.path("dit"),
                           num_samples=n, labels=labels, chunk_size=n, grid=0)
    with np.load(demo.path("samples", "samples.npz")) as data:
        images, classes = data["arr_0"], data["arr_1"]
    rows = [images[classes == c][:GRID_COLUMNS] for c in range(NUM_CLASSES)]
    from launch.images import labelled_grid

    shown = np.concatenate(rows)
    names = _class_names(demo)
    grid = labelled_grid(shown, np.repeat(np.arange(NUM_CLASSES), [len(r) for r in rows]),
                         ncols=GRID_COLUMNS, class_names=names, rows=True)
    from PIL import Image

    Image.fromarray(grid).save(demo.path("samples.png"))
    return {"num_samples": summary["num_samples"]}


def _class_names(demo: Demo) -> list[str]:
    from launch.data.sources import find_classes

    return find_classes(demo.path("data", "shapes32"))


# -- 6. evaluation ----------------------------------------------------------------------------


def evaluate(demo: Demo) -> dict:
    from launch import evaluation, sharding
    from launch.build import autoencoder
    from launch.data.extraction import load_autoencoder_params
    from launch.data.sources import ImageFolderSource
    from launch.images import save_grid
    from launch.tokenizer_eval import evaluate_tokenizer

    s = demo.sizes
    mesh = sharding.create_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    heldout, heldout_labels = judge.load_folder(demo.path("data", "heldout32"))
    train_images, train_labels = judge.load_folder(demo.path("data", "shapes32"))

    # the tokenizer: reconstructions of images it never trained on (no LPIPS: its VGG would
    # be random here)
    vcfg = demo.vavae_config()
    vae = autoencoder(vcfg)
    vae_params = load_autoencoder_params(vcfg, vae, demo.path("vavae"), mesh)
    recon = evaluate_tokenizer(ImageFolderSource(demo.path("data", "heldout32")), vae,
                               vae_params, None, None, image_size=32, batch_size=64,
                               mesh=mesh, seed=vcfg.seed, keep=len(heldout), progress=False)
    originals, recons = recon.pop("examples")
    first = [int(np.argmax(heldout_labels == c)) for c in range(NUM_CLASSES)]  # one per class
    save_grid(demo.path("reconstructions.png"), np.concatenate([originals[first],
                                                                recons[first]]),
              ncols=NUM_CLASSES, upscale=2)

    # the judge, trained on the held-out shapes only
    model, params = judge.classifier_for(demo.path("classifier"), heldout, heldout_labels,
                                         num_classes=NUM_CLASSES, steps=s.classifier_steps)
    extract = evaluation.sharded_extractor(
        lambda p, x: model.apply({"params": p}, x), params, batch_size=100, mesh=mesh)
    with np.load(demo.path("samples", "samples.npz")) as data:
        samples, labels = data["arr_0"], data["arr_1"]
    sample_logits = extract(samples)["logits"]
    real = evaluation.Batch("held-out shapes", images=heldout)
    # float32 distances: the judge's features have squared norms near 8,700, where float16's
    # steps (4-8) would swamp the 3-NN radii (about 14); ADM's float16 suits Inception's pool3
    metrics = functools.partial(evaluation.evaluate, pr_distances="float32")
    result = metrics(evaluation.Batch("samples", images=samples), real, extract)
    floor = metrics(evaluation.Batch("training shapes", images=train_images[
        np.random.default_rng(0).permutation(len(train_images))[:len(samples)]]), real, extract)
    return {
        "recon_psnr": recon["psnr"], "recon_ssim": recon["ssim"],
        "classifier_accuracy": judge.accuracy(model, params, train_images, train_labels),
        "sample_accuracy": float(np.mean(sample_logits.argmax(-1) == labels)),
        "fd": result["fid"], "fd_real_images": floor["fid"],
        "precision": result.get("precision"), "recall": result.get("recall"),
    }


# -- 7. export --------------------------------------------------------------------------------


def export(demo: Demo) -> dict:
    from launch.convert import convert

    out = demo.path("export")
    os.makedirs(out, exist_ok=True)
    files = {
        "lightningdit": os.path.join(out, "lightningdit-demo.pt"),  # {'model', 'ema'}
        "vavae": os.path.join(out, "vavae-demo.pt"),  # upstream AutoencoderKL state dict
        "latents_stats": os.path.join(out, "latents_stats.pt"),
    }
    for name, run in (("lightningdit", "dit"), ("vavae", "vavae")):
        if not os.path.exists(files[name]):  # the run's own config describes the model
            convert("dit" if name == "lightningdit" else "vavae", demo.path(run), files[name])
    shutil.copyfile(demo.path("latents", "latents_stats.pt"), files["latents_stats"])
    logging.info("exported %s", ", ".join(files.values()))
    return {"files": files}


STAGES = [
    ("data", "generate the procedural shapes", make_data),
    ("vavae", "train the VA-VAE (L1 + KL + PatchGAN + VF loss)", train_vavae),
    ("latents", "extract latents and their statistics", extract),
    ("lightningdit", "train LightningDiT on the latents", train_dit),
    ("sample", "sample a class grid with CFG and decode it", sample),
    ("evaluate", "reconstruction PSNR, sample accuracy and Frechet distance", evaluate),
    ("export", "export upstream PyTorch checkpoints", export),
]
