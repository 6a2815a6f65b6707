"""VA-VAE tokenizer configs: `get_config("<variant>")`.

Variants (upstream vavae/configs/*.yaml; 256 global batch = 32 GPUs x 8, Adam 1e-4 (0.5, 0.9)):
  tiny            CPU-sized model for tests and the demo (32x32 images, 8x8x4 latents,
                  2-block DINOv2 with random weights).
  f16d32_vfdinov2 the 50-epoch VA-VAE (vf_weight 0.1 adaptive, margins 0.25 / 0.5).
  long_stage1     released schedule, stage 1: 100 epochs, vf_weight 0.5, no margins.
  long_stage2     stage 2: 15 epochs, disc_start 1, vf_weight 0.1, no margins.
  long_stage3     stage 3 (= the released tokenizer): 15 epochs, margins 0.25 / 0.5.
  f16d32_ldm      the plain LDM KL-VAE baseline (no VF loss).
  demo            tiny, tuned to learn the shapes in minutes (python -m launch.demo).

Train (rerun the same command to resume; stages chain with --config.init_from=<previous run>):
  python -m launch.train --config configs/vavae.py:long_stage1 --workdir runs/vavae_s1 \
      --config.data.path /data/imagenet/train \
      --config.foundation.checkpoint dinov2_vitl14_pretrain.pth \
      --config.lpips.vgg16 vgg16-397923af.pth --config.lpips.heads vgg.pth
  python -m launch.train --config configs/vavae.py:long_stage2 --workdir runs/vavae_s2 \
      --config.init_from runs/vavae_s1 ...
  python -m launch.train --config configs/vavae.py:tiny --workdir runs/vavae_tiny   # CPU
Extract latents for LightningDiT:
  python -m launch.extract_latents --config configs/vavae.py:long_stage3 \
      --config.data.path /data/imagenet/train --workdir /data/latents --checkpoint runs/vavae_s3

`disc_start` counts PyTorch Lightning global steps (two per iteration) as upstream does.
Weights the frozen parts need (not downloaded at run time): DINOv2 ViT-L/14 (timm
`vit_large_patch14_dinov2.lvd142m` or the official `dinov2_vitl14_pretrain.pth`), torchvision
`vgg16-397923af.pth` and the LPIPS heads `vgg.pth`; see README "Using released PyTorch
weights" (VA-VAE).
"""

import ml_collections

ITERATIONS_PER_EPOCH = 5005  # ImageNet train / 256, as upstream's Lightning epochs
F16D32 = dict(double_z=True, z_channels=32, resolution=256, in_channels=3, out_ch=3, ch=128,
              ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0)


def get_config(arg: str = "long_stage3") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.family = "vavae"
    config.variant = arg
    config.seed = 23
    # the loop (python -m launch.train): ~5,005 iterations per ImageNet epoch at batch 256
    config.total_steps = 0  # set below from train.epochs (tiny: 100)
    config.log_every = 50
    config.ckpt_every = 5005
    config.sample_every = 750
    config.max_to_keep = 3
    config.keep_period = 0
    config.model = ml_collections.ConfigDict(
        {"embed_dim": 32, "ddconfig": dict(F16D32), "use_vf": "dinov2", "dtype": "float32",
         "remat": False})
    # frozen weights (launch/training/frozen.py): DINOv2 file or orbax dir; LPIPS's two files
    config.foundation = ml_collections.ConfigDict(
        {"size": "L", "overrides": {}, "imagenet_norm": False, "checkpoint": ""})
    config.lpips = ml_collections.ConfigDict({"vgg16": "", "heads": ""})
    config.shard_frozen = False  # True: FSDP-shard the frozen tree instead of replicating it
    # without weight files, run on random ones (with a loud warning) instead of stopping: only
    # the CPU-sized configs (tiny, demo) allow it
    config.random_weights_ok = False
    config.discriminator = ml_collections.ConfigDict({"ndf": 64, "n_layers": 3})
    config.loss = ml_collections.ConfigDict({
        "kl_weight": 1e-6, "perceptual_weight": 1.0, "logvar": 0.0, "disc_start": 5001,
        "disc_factor": 1.0, "disc_weight": 0.5, "disc_loss": "hinge", "vf_weight": 0.1,
        "adaptive_vf": True, "distmat_margin": 0.25, "cos_margin": 0.5,
        "distmat_weight": 1.0, "cos_weight": 1.0, "steps_per_iteration": 2,
        # > 1: adaptive weights and discriminator BatchNorm statistics per group of
        # global_batch_size / ddp_replicas images, as upstream's DDP per GPU (32 x 8 images)
        "ddp_replicas": 1})
    config.optimizer = ml_collections.ConfigDict(
        {"lr": 1e-4, "b1": 0.5, "b2": 0.9, "proj_fix": False})
    config.train = ml_collections.ConfigDict(
        {"global_batch_size": 256, "epochs": 50})
    # dcn_data > 1 splits the data axis over slices / nodes (data-center network)
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 1})
    config.num_devices = 0  # train on the first n devices (0: all)
    # weights to start from (a fresh run only; a workdir with checkpoints resumes instead)
    config.init_from = ""
    # a NaN / Inf loss or gradient norm: 'stop' (naming the step and metric) or 'skip' the update
    config.nan_policy = "stop"
    # jax.transfer_guard around every step after the first: 'allow', 'log' or 'disallow' (an
    # implicit host<->device copy in the loop is logged / raises; explicit ones are fine)
    config.transfer_guard = "allow"
    config.data = data_config()
    # latent extraction (python -m launch.extract_latents): ADM center crop of data.image_size,
    # each image and its mirror encoded, `shard_size` latents per file as upstream
    config.extract = ml_collections.ConfigDict(
        {"batch_size": 256, "shard_size": 10_000, "stats_images": 10_000})

    if arg in ("tiny", "demo"):
        config.random_weights_ok = True
        config.model.embed_dim = 4
        config.model.ddconfig.update(z_channels=4, resolution=32, ch=32, ch_mult=(1, 2, 2),
                                     num_res_blocks=1, attn_resolutions=(8,))
        config.foundation.update(size="S", overrides={"embed_dim": 32, "depth": 2,
                                                      "num_heads": 2})
        config.discriminator.update(ndf=8, n_layers=2)
        config.loss.update(disc_start=0, perceptual_weight=0.0)
        config.train.update(global_batch_size=8, epochs=1)
        config.update(total_steps=100, log_every=10, ckpt_every=50, sample_every=50)
        # the procedural shapes dataset (written on first use, no download)
        config.data.update(path="runs/data/shapes32", image_size=32, worker_count=0,
                           procedural_images_per_class=300, exclude=())
        config.extract.update(batch_size=64, shard_size=1000)
    if arg == "demo":
        # larger batches and lr than tiny, the discriminator joins for the last quarter
        # (disc_start counts two Lightning steps per iteration); LPIPS stays off, as its VGG
        # would be random. launch.demo sets total_steps, data.path and the images per class.
        config.train.global_batch_size = 32
        config.optimizer.lr = 5e-4
        config.loss.disc_start = 2 * 600
        config.update(total_steps=800, log_every=100, ckpt_every=200, sample_every=400)
    elif arg in ("tiny", "f16d32_vfdinov2"):
        pass
    elif arg == "long_stage1":
        config.loss.update(vf_weight=0.5, distmat_margin=0.0, cos_margin=0.0)
        config.train.epochs = 100
    elif arg == "long_stage2":
        config.loss.update(disc_start=1, distmat_margin=0.0, cos_margin=0.0)
        config.train.epochs = 15
    elif arg == "long_stage3":
        config.loss.update(disc_start=1)
        config.train.epochs = 15
    elif arg == "f16d32_ldm":
        config.model.use_vf = None
    else:
        raise ValueError(f"unknown config variant {arg!r}: tiny, demo, f16d32_vfdinov2, "
                         "long_stage1..3, f16d32_ldm")
    if arg not in ("tiny", "demo"):
        config.total_steps = config.train.epochs * ITERATIONS_PER_EPOCH
    return config


def data_config() -> ml_collections.ConfigDict:
    """The image pipeline (`launch.data.image_pipeline`) as upstream's VA-VAE training reads it:
    SmallestMaxSize(256) bilinear + RandomCrop(256), no flip, one file left out."""
    return ml_collections.ConfigDict({
        # 'folder': config.data.path = ImageNet's train/ (train/<wnid>/*.JPEG);
        # 'array_record': a directory of shards from `python -m launch.data.array_record`;
        # 'tfds': the tfds data_dir holding imagenet2012 prepared as array_record
        "source": "folder",
        "path": "",
        "split": "train",
        "tfds_name": "imagenet2012",
        "image_size": 256,
        "preprocess": "random_crop",  # 'center_crop' = ADM center_crop_arr (extraction)
        "flip_prob": 0.0,
        "shuffle": True,
        "exclude": ("n06596364_9591.JPEG",),
        # ~4 cores decode JPEGs for 8 H100s at 40% MFU (python -m bench.data_pipeline)
        "worker_count": 4,  # grain worker processes decoding images
        "read_threads": 8,  # batches built at once per worker (at most `prefetch`)
        "prefetch": 8,  # batches prefetched per worker
        "max_bad_fraction": 0.01,  # undecodable fraction that stops the run
        "bad_fraction_min_items": 1000,  # ... checked once this many items were read
        "max_attempts": 16,  # bad items in a row for one slot that stop the run
        "procedural_images_per_class": 0,  # > 0: write the shapes dataset at path first
    })

