"""Host input pipelines (JPEGs for VA-VAE, latents for LightningDiT) vs what one chip consumes.

    python -m bench.data_pipeline                   # defaults: ~3.5 min on a 2-vCPU machine
    python -m bench.data_pipeline --num_images 512 --batch 64 --seconds 20 --json out.json
    python -m bench.data_pipeline --data /tmp/jpegs # write the JPEG tree once, then reuse it

Times one thread of PIL decode + ADM center crop on generated ImageNet-like JPEGs (the
reference), the real grain pipelines (`make_image_iterator`, center / random crop, 0-2 workers)
and `make_latent_iterator` on f16d32 shards; start-up (time to the first batch) apart from the
steady rate. FLOPs per training image (XLA cost analysis of the real modules, no weights) turn
accelerator peaks into images/s per chip, and so into host cores per chip.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

# (width, height) and how often: ImageNet train is mostly 500x375 / 375x500
SIZES = [((500, 375), 0.55), ((375, 500), 0.25), ((500, 333), 0.06), ((333, 500), 0.04),
         ((500, 500), 0.04), ((640, 480), 0.03), ((1024, 768), 0.02), ((240, 180), 0.01)]
CLASSES = 8
PEAKS = {"H100 (989 TFLOP/s bf16 dense, 40% MFU)": (989e12, 0.40, 8),
         "TPU v5e (197 TFLOP/s bf16, 50% MFU)": (197e12, 0.50, 8)}
DIT_FORWARD_GFLOP = 237.2  # LightningDiT-XL/1, 16x16 tokens, 2*MAC (bench/dit_throughput.py)
UPSTREAM_DIT_IMG_S = 5.28 * 1024 / 32  # docs/log.txt: 5.28 steps/s, batch 1024, 32 H800
# multiples of one image's forward pass in a VA-VAE training step: autoencoder forward +
# backward (activations and weights); frozen DINOv2 forward on x only; LPIPS forward on the
# (x, x_rec) pair + the data gradient through the x_rec half; discriminator: D(x_rec) forward +
# data gradient in the generator step (2), then D(x) and D(x_rec) with weight gradients in the
# D step (2 x 3). Left out: the adaptive-weight gradients and the VF loss (< 0.3 GFLOP).
VAVAE_MULTIPLIERS = {"autoencoder": 3.0, "dinov2_L_224": 1.0, "lpips_pair": 1.5,
                     "discriminator": 8.0}


def smooth_field(rng, cells: int, size: tuple[int, int], channels: int) -> np.ndarray:
    """Gaussian noise on a cells x cells grid, bicubic-upsampled to `size` (w, h)."""
    low = rng.normal(0, 1, (cells, cells, channels)).astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(low[..., c], "F").resize(size, Image.BICUBIC))
                     for c in range(channels)], -1)


def texture_jpeg(rng, size: tuple[int, int]) -> bytes:
    """Smooth colour fields + varying grain + edges: photo-like entropy (decode time follows
    the coded size; flat synthetic images would flatter the decoder)."""
    w, h = size
    img = np.full((h, w, 3), 128, np.float32)
    for cells, amp in ((3, 50), (12, 25), (48, 12)):
        img += amp * smooth_field(rng, cells, size, 3)
    grain = 21 * rng.lognormal(0, 0.25) * np.clip(0.9 + 0.5 * smooth_field(rng, 4, size, 1),
                                                  0.05, 2.0)
    img += grain * rng.normal(0, 1, (h, w, 1)).astype(np.float32)  # luminance detail
    img += 0.4 * grain * rng.normal(0, 1, (h, w, 3)).astype(np.float32)
    image = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        draw.line([tuple(rng.integers(0, size)), tuple(rng.integers(0, size))],
                  fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
                  width=int(rng.integers(1, 5)))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def write_jpeg_tree(root: str, num_images: int, seed: int) -> tuple[list[str], list[str]]:
    """root/class_k/img_i.JPEG (files already there are kept, so --data DIR is reused);
    returns the paths and their sizes 'WxH'."""
    rng = np.random.default_rng(seed)
    paths, shapes = [], []
    for i in range(num_images):
        size = SIZES[rng.choice(len(SIZES), p=[p for _, p in SIZES])][0]
        shapes.append(f"{size[0]}x{size[1]}")
        path = os.path.join(root, f"class_{i % CLASSES:03d}", f"img_{i:06d}.JPEG")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(texture_jpeg(np.random.default_rng([seed, i]), size))
        paths.append(path)
    return paths, shapes


def raw_rate(paths: list[str], mode: str, seconds: float) -> float:
    """Images per CPU-second of one thread: read + PIL decode (+ crop to 256), no grain,
    cv2 on one thread."""
    import cv2

    from launch.data.preprocess import center_crop_arr, resize_random_crop

    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        with open(paths[count % len(paths)], "rb") as f:
            image = Image.open(io.BytesIO(f.read())).convert("RGB")
        if mode == "center_crop":
            center_crop_arr(image, 256)
        elif mode == "random_crop":
            resize_random_crop(np.asarray(image), 256, rng)
        count += 1
    return count / (time.process_time() - cpu)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its children (grain's workers) so far. This
    VM's vCPUs share physical cores (2 vCPUs gave 1.0 to 2.0 cores' work from one minute to
    the next), so images per CPU-second, not per wall second, is the rate per core."""
    import psutil

    me = psutil.Process()
    return sum(sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)])


def time_iterator(it, batch: int, seconds: float, warmup: int) -> dict:
    """Start-up = time to the first batch; then `warmup` batches (the prefetch burst) are
    skipped and the steady rate is counted over `seconds` of wall time."""
    start = time.perf_counter()
    next(it)
    startup = time.perf_counter() - start
    for _ in range(warmup):
        next(it)
    count, t0, cpu0 = 0, time.perf_counter(), cpu_seconds()
    while time.perf_counter() - t0 < seconds:
        next(it)
        count += 1
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    it.close()
    return {"startup_s": startup, "per_s": count * batch / wall, "cores_busy": cpu / wall,
            "per_cpu_s": count * batch / cpu}


def measure(make_iterator, configs: dict, batch: int, seconds: float, rounds: int) -> dict:
    """Each config in `rounds` rounds of seconds / rounds, every other round in reverse order
    (ABBA), so drift in this shared machine's speed does not favour the configs run first."""
    runs = {name: [] for name in configs}
    for r in range(rounds):
        for name in list(configs)[:: 1 if r % 2 == 0 else -1]:
            data = configs[name]
            # batches already buffered when the first arrives: `prefetch` per worker (or
            # in-process) plus grain's one-batch buffer per worker
            warmup = data.prefetch * max(data.worker_count, 1) + data.worker_count
            runs[name].append(time_iterator(make_iterator(data), batch, seconds / rounds,
                                            warmup))
    return {name: {**{k: float(np.mean([x[k] for x in rs])) for k in rs[0]},
                   "rounds_per_s": [x["per_s"] for x in rs]} for name, rs in runs.items()}


def image_pipelines(root: str, args) -> dict:
    from configs.vavae import data_config
    from launch.data.image_pipeline import make_image_iterator

    configs = {}
    for mode in ("center_crop", "random_crop"):
        for workers in args.workers:
            configs[f"{mode} workers={workers}"] = data = data_config()
            data.update(path=root, image_size=256, preprocess=mode, worker_count=workers)
    return measure(lambda data: make_image_iterator(data, global_batch_size=args.batch, seed=0),
                   configs, args.batch, args.seconds, args.rounds)


def latent_pipelines(root: str, args) -> dict:
    """f16d32 latents (N, 32, 16, 16) in upstream's layout, read as config xl1_64ep says."""
    from configs.lightningdit import get_config
    from launch.data import latents as lat

    os.makedirs(root)
    rng = np.random.default_rng(args.seed)
    for shard, rows in enumerate(np.array_split(np.arange(args.num_latents), 4)):
        z = rng.normal(0, 1, (len(rows), 32, 16, 16)).astype(np.float32)
        lat.write_latent_shard(os.path.join(root, lat.SHARD_PATTERN.format(rank=0, shard=shard)),
                               z, z[..., ::-1], rng.integers(0, 1000, len(rows)))
    lat.save_latent_stats(os.path.join(root, "latents_stats.pt"), np.zeros(32), np.ones(32))
    configs = {}
    for workers in (0, 2):
        configs[f"latents workers={workers}"] = data = get_config("xl1_64ep").data
        data.update(path=root, worker_count=workers)
    return measure(lambda data: lat.make_latent_iterator(
        data, global_batch_size=args.latent_batch, seed=0, num_classes=1000, latent_size=16,
        channels=32), configs, args.latent_batch, args.seconds / 2, args.rounds)


def module_gflop(module, inputs, kwargs) -> dict:
    """GFLOP of `module.apply(variables, *inputs, **kwargs)`: XLA cost analysis of the lowered
    HLO (compiled only if that gives none), abstract variables from jax.eval_shape."""
    import jax
    from flax import linen as nn

    start, key = time.perf_counter(), jax.random.key(0)
    variables = nn.meta.unbox(jax.eval_shape(lambda *a: module.init(key, *a, **kwargs), *inputs))
    lowered = jax.jit(lambda v, *a: module.apply(v, *a, **kwargs)).lower(variables, *inputs)
    cost = lowered.cost_analysis() or lowered.compile().cost_analysis()
    return {"gflop": (cost[0] if isinstance(cost, list) else cost)["flops"] / 1e9,
            "seconds": time.perf_counter() - start}


def forward_gflop() -> dict:
    """One image's forward GFLOP per module of the VA-VAE step (and DiT-XL/1 as a check)."""
    import jax
    import jax.numpy as jnp

    from configs import lightningdit, vavae
    from launch import build

    models, _, _ = build.vavae_models(vavae.get_config("long_stage3"))
    img = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    dit_inputs = (jax.ShapeDtypeStruct((1, 16, 16, 32), jnp.float32),
                  jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32))
    cases = {  # name: (module, inputs, apply kwargs)
        "autoencoder": (models.autoencoder, (img,), {"rng": jax.random.key(1)}),
        "dinov2_L_224": (models.foundation,
                         (jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),), {}),
        "lpips_pair": (models.lpips, (img, img), {}),  # x and x_rec both go through VGG16
        "discriminator": (models.discriminator, (img,), {"train": False}),
        "dit_xl1": (build.dit_model(lightningdit.get_config("xl1_64ep")),
                    dit_inputs, {}),
    }
    return {name: module_gflop(*case) for name, case in cases.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64, help="image batch (per host)")
    parser.add_argument("--latent_batch", type=int, default=256, help="8 GPUs x upstream's 32")
    parser.add_argument("--num_latents", type=int, default=4096, help="in 4 shards")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="steady-state time per image pipeline, all rounds (latents: half)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", default="", help="JPEG tree to write or reuse (default: temp)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the numbers here")
    args = parser.parse_args(argv)
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read the absl flags
    start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
    root = args.data or os.path.join(tmp.name, "jpegs")
    paths, shapes = write_jpeg_tree(root, args.num_images, args.seed)
    kb = np.array([os.path.getsize(p) for p in paths]) / 1e3
    print(f"== {len(paths)} JPEGs (quality 90, {CLASSES} classes) at {root}: mean "
          f"{kb.mean():.1f} KB (min {kb.min():.0f}, max {kb.max():.0f}); page-cached, so rates "
          "are CPU-bound\n   sizes: " + ", ".join(
              f"{k} x{v}" for k, v in collections.Counter(shapes).most_common()))

    raw = {mode: raw_rate(paths, mode, 3.0) for mode in ("no crop", "center_crop", "random_crop")}
    ref = raw["center_crop"]
    print(f"== one thread ({len(os.sched_getaffinity(0))} vCPUs here), no grain, cv2 on one "
          "thread, crop 256 (reference: center_crop)\n" +
          "\n".join(f"  read + decode + {k:24s} {v:7.1f} img/CPU-s   x{v / ref:.2f}"
                    for k, v in raw.items()))

    print(f"== grain pipelines, mesh=None: make_image_iterator (batch {args.batch}, 256 px, "
          f"data_config(): read_threads 8, prefetch 8) and make_latent_iterator ("
          f"{args.num_latents} x (32, 16, 16) in 4 shards, batch {args.latent_batch}, "
          f"xl1_64ep data); {args.rounds} ABBA rounds\n  {'':24s} {'per s':>8s} {'x ref':>6s} "
          f"{'start-up s':>10s} {'cores busy':>10s} {'per CPU-s':>10s} {'x ref':>6s}  rounds")
    images = image_pipelines(root, args)
    latents = latent_pipelines(os.path.join(tmp.name, "latents"), args)
    for name, r in {**images, **latents}.items():
        ratios = [f"{'-':>6s}"] * 2  # a latent is no JPEG: no ratio to the decode reference
        if name in images:
            r["x_reference"], r["cpu_x_reference"] = r["per_s"] / ref, r["per_cpu_s"] / ref
            ratios = [f"{r['x_reference']:6.2f}", f"{r['cpu_x_reference']:6.2f}"]
        print(f"  {name:24s} {r['per_s']:8.0f} {ratios[0]} {r['startup_s']:10.1f} "
              f"{r['cores_busy']:10.2f} {r['per_cpu_s']:10.0f} {ratios[1]}  "
              + ", ".join(f"{x:.0f}" for x in r["rounds_per_s"]))

    fwd = forward_gflop()
    terms = {name: k * fwd[name]["gflop"] for name, k in VAVAE_MULTIPLIERS.items()}
    gflop = {"lightningdit_xl1": 3 * DIT_FORWARD_GFLOP, "vavae": sum(terms.values())}
    print("== GFLOP per image (2*MAC): XLA cost_analysis() of the lowered forward at batch 1, "
          "eval_shape params")
    for name, r in fwd.items():
        print(f"  {name:14s} forward {r['gflop']:7.1f}   ({r['seconds']:.1f} s)")
    print(f"  VA-VAE training: {gflop['vavae']:.0f} = " + " + ".join(
        f"{v:.0f} {k} (x{VAVAE_MULTIPLIERS[k]})" for k, v in terms.items()))
    dit_tflops = UPSTREAM_DIT_IMG_S * gflop["lightningdit_xl1"] / 1e3
    print(f"  LightningDiT-XL/1 training: 3 x {DIT_FORWARD_GFLOP} (analytic) = "
          f"{gflop['lightningdit_xl1']:.1f}; upstream: 5.28 steps/s x 1024 / 32 H800 = "
          f"{UPSTREAM_DIT_IMG_S:.0f} img/s/GPU = {dit_tflops:.0f} TFLOP/s "
          f"({dit_tflops / 9.89:.0f}% of 989)")

    # a core's rate: per CPU-second, in worker processes as training runs them
    per_core = {"vavae": images[f"random_crop workers={max(args.workers)}"]["per_cpu_s"],
                "lightningdit_xl1": latents["latents workers=2"]["per_cpu_s"]}
    rows = [("lightningdit_xl1", "H800 as upstream measured", UPSTREAM_DIT_IMG_S, 8)] + [
        (model, chip, peak * mfu / (gflop[model] * 1e9), per_host)
        for model in gflop for chip, (peak, mfu, per_host) in PEAKS.items()]
    print(f"== one chip's intake vs a core of this machine (random_crop workers="
          f"{max(args.workers)}, latents workers=2, per CPU-second)\n"
          f"  {'model':17s} {'chip':38s} {'img/s/chip':>10s} {'per host':>16s} "
          f"{'img/s/core':>10s} {'cores/chip':>10s} {'cores/host':>10s}")
    for i, (model, chip, need, per_host) in enumerate(rows):
        rows[i] = {"model": model, "chip": chip, "img_per_s_per_chip": need,
                   "chips_per_host": per_host, "img_per_s_per_core": per_core[model],
                   "cores_per_chip": need / per_core[model]}
        print(f"  {model:17s} {chip:38s} {need:10.0f} {need * per_host:7.0f} ({per_host} chips) "
              f"{per_core[model]:10.0f} {need / per_core[model]:10.3f} "
              f"{need * per_host / per_core[model]:10.2f}")
    print(f"  (4-chip v5e hosts: half the per-host figures)  total "
          f"{time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "vcpus": len(os.sched_getaffinity(0)),
                       "jpegs": {"mean_kb": kb.mean(), "sizes": collections.Counter(shapes)},
                       "raw_img_per_cpu_s": raw, "image_pipeline": images,
                       "latent_pipeline": latents, "forward_gflop": fwd, "train_gflop": gflop,
                       "requirements": rows}, f, indent=2, default=float)
    tmp.cleanup()


if __name__ == "__main__":
    main()
