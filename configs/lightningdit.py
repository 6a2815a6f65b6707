"""LightningDiT configs: `get_config("<variant>")`.

Variants:
  tiny        CPU-sized demo model (4x8x8 latents, 10 classes); sampling runs in seconds.
  xl1_64ep    LightningDiT-XL/1 on VA-VAE f16d32 latents, sampled like the FID 2.11 release
              (cfg 10.0, interval from t = 0.10, 3 guided channels, shift 0.3, Euler 250).
  xl1_800ep   same model, sampled like the FID 1.35 release (cfg 6.7, interval from 0.125).
  b1, l1      LightningDiT-B/1 and L/1 with the released flags and XL's recipe (as upstream).
  demo        tiny, 4 blocks of width 128, tuned to learn the shapes in minutes (launch.demo).

Train (rerun the same command to resume; --config.x=y overrides any field):
  python -m launch.train --config configs/lightningdit.py:xl1_64ep --workdir runs/xl1 \
      --config.data.path /data/latents/imagenet_train_256
  python -m launch.train --config configs/lightningdit.py:tiny --workdir runs/dit_tiny
  (tiny: extracts its latents from the procedural shapes on first use, trains on the CPU)

Sample (the tiny demo needs no downloads):
  python -m launch.sample --config configs/lightningdit.py:tiny --workdir runs/demo
Sample from a released checkpoint converted on the fly:
  python -m launch.sample --config configs/lightningdit.py:xl1_800ep --workdir runs/xl \
      --checkpoint lightningdit-xl-imagenet256-800ep.pt --num_samples 8
Any field can be overridden: --config.sample.cfg_scale=4.0 --config.sample.cfg_channels=-1
(cfg_channels = -1 guides every channel, the standard CFG).
"""

import ml_collections

from dit_jax.model import RELEASED_FLAGS, VARIANTS


def _model(variant: str, name: str | None = None, **overrides) -> ml_collections.ConfigDict:
    """`variant`'s sizes with the released flags; `name` labels a customised variant."""
    return ml_collections.ConfigDict({
        "variant": name or variant,
        **VARIANTS[variant],
        **RELEASED_FLAGS,
        "mlp_ratio": 4.0,
        "class_dropout_prob": 0.1,
        "num_classes": 1000,
        "learn_sigma": False,
        "dtype": "float32",
        "remat": False,
        # '' picks per backend (the explicit core on CPU, jax.nn's default elsewhere: XLA's
        # path); or 'explicit', 'xla', 'cudnn' (dit_jax.ops.dot_product_attention)
        "attention_impl": "",
        **overrides,
    })


def get_config(arg: str = "xl1_64ep") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.family = "lightningdit"
    config.variant = arg
    config.seed = 0
    # the loop (python -m launch.train): steps, logging, checkpoints, sample grids
    config.total_steps = 80_000
    config.log_every = 100
    config.ckpt_every = 20_000
    config.sample_every = 0  # 0: never
    config.max_to_keep = 3
    config.keep_period = 0  # keep every k-th checkpoint besides the last max_to_keep (0: none)

    # uniform_time_after > 0: uniform t from that step on (0: never)
    config.transport = ml_collections.ConfigDict(
        {"time_dist": "logit_normal", "use_cosine_loss": True, "uniform_time_after": 0})
    # upstream: constant lr, no warmup, no clipping (max_grad_norm 0 = off); decay 'cosine' /
    # 'linear' reaches final_lr_fraction * lr at decay_steps (0: total_steps)
    config.optimizer = ml_collections.ConfigDict({
        "lr": 2e-4, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.0,
        "max_grad_norm": 0.0, "warmup_steps": 0, "decay": "constant", "decay_steps": 0,
        "final_lr_fraction": 0.0})
    # grad_accum_steps k: each step averages the gradients of k micro-batches of the global batch
    # (same loss and randomness as one big batch; k times less activation memory)
    config.train = ml_collections.ConfigDict(
        {"global_batch_size": 1024, "ema_decay": 0.9999, "grad_accum_steps": 1})
    config.sample = ml_collections.ConfigDict({
        "method": "euler", "num_steps": 250, "timestep_shift": 0.3, "cfg_scale": 10.0,
        "cfg_interval_start": 0.10, "cfg_channels": 3, "batch_size": 4})
    # Channel-wise latent statistics (upstream latents_stats.pt) for de-normalising samples;
    # empty = leave the sampled latents normalised.
    config.latent_stats = ""
    # the VA-VAE that decodes training sample grids (configs/vavae.py variant + its weights);
    # empty: grids show the first three latent channels
    config.tokenizer = ml_collections.ConfigDict({"variant": "", "checkpoint": ""})
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
    # latents in upstream's layout (launch.data.latents): `latents` or `latents_flip` with
    # p = 0.5, normalised with latents_stats.pt, as upstream's ImgLatentDataset
    config.data = ml_collections.ConfigDict({
        "source": "latents",
        "path": "",  # the directory of latents_rank*_shard*.safetensors + latents_stats.pt
        "latent_norm": True,
        "latent_multiplier": 1.0,
        "flip": True,
        "worker_count": 2,
        "read_threads": 1,  # a latent is ~45 us of Python: threads only contend for the GIL
        "prefetch": 8,
        "max_bad_fraction": 0.0,
        "bad_fraction_min_items": 1000,
        "max_attempts": 4,
        "prepare": "",  # a configs/vavae.py variant: extract latents when path is absent
        "prepare_checkpoint": "",  # ... with these VA-VAE weights
        "prepare_images": "",  # ... from these images ('': that variant's data.path)
    })

    if arg in ("tiny", "demo"):
        config.model = _model("LightningDiT-S/2", name="tiny", depth=2, hidden_size=64,
                              num_heads=4, input_size=8, in_channels=4, num_classes=10)
        config.train.global_batch_size = 16
        config.update(total_steps=100, log_every=10, ckpt_every=50, sample_every=50)
        config.sample.update(num_steps=16, cfg_scale=4.0, cfg_interval_start=0.1,
                             cfg_channels=-1, batch_size=8)
        # latents of the procedural shapes, extracted by the tiny VA-VAE:
        #   python -m launch.extract_latents --config configs/vavae.py:tiny \
        #       --workdir runs/data/shapes32_latents
        # prepared on first use when absent: the shapes through configs/vavae.py:tiny (random
        # weights unless data.prepare_checkpoint names a trained VA-VAE)
        config.data.update(path="runs/data/shapes32_latents", worker_count=0, prepare="tiny",
                           prepare_checkpoint="")
        config.tokenizer.variant = "tiny"  # the VA-VAE that made the latents
    if arg == "demo":
        # launch.demo sets total_steps, data.path and tokenizer.checkpoint; the EMA must
        # follow a run of a few thousand steps
        config.model.update(variant="demo", depth=4, hidden_size=128)
        config.train.update(global_batch_size=64, ema_decay=0.995)
        config.optimizer.lr = 5e-4
        config.update(total_steps=2000, log_every=100, ckpt_every=500, sample_every=1000)
        config.data.update(path="runs/demo/latents", prepare="")
        config.tokenizer.variant = "demo"
    elif arg == "tiny":
        pass
    elif arg == "xl1_64ep":
        config.model = _model("LightningDiT-XL/1")
    elif arg == "xl1_800ep":
        config.model = _model("LightningDiT-XL/1")
        config.sample.update(cfg_scale=6.7, cfg_interval_start=0.125)
        config.total_steps = 1_000_000  # ~800 epochs at 1,251 steps each (upstream issue #23)
        config.transport.uniform_time_after = 600_000  # logit-normal off at 600k (issue #23)
        config.ckpt_every = 50_000
    elif arg == "b1":
        config.model = _model("LightningDiT-B/1")
    elif arg == "l1":
        config.model = _model("LightningDiT-L/1")
    else:
        raise ValueError(f"unknown config variant {arg!r}: tiny, demo, xl1_64ep, xl1_800ep, "
                         "b1, l1")
    return config

