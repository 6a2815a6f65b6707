"""The reproduction configs carry upstream's recipe (SPEC 3.7, 4.1, 4.5, 6.7)."""

import pytest

from configs.lightningdit import get_config as dit_config
from configs.vavae import get_config as vavae_config


@pytest.mark.parametrize("variant", ["xl1_64ep", "xl1_800ep", "b1", "l1"])
def test_lightningdit_training_recipe(variant):
    c = dit_config(variant)
    assert dict(c.optimizer) == {"lr": 2e-4, "b1": 0.9, "b2": 0.95, "eps": 1e-8,
                                 "weight_decay": 0.0, "max_grad_norm": 0.0, "warmup_steps": 0,
                                 "decay": "constant", "decay_steps": 0,
                                 "final_lr_fraction": 0.0}
    assert (c.train.global_batch_size, c.train.ema_decay) == (1024, 0.9999)
    assert (c.transport.time_dist, c.transport.use_cosine_loss) == ("logit_normal", True)
    assert (c.model.class_dropout_prob, c.model.num_classes, c.model.in_channels,
            c.model.input_size) == (0.1, 1000, 32, 16)
    assert (c.data.latent_norm, c.data.latent_multiplier, c.data.flip) == (True, 1.0, True)
    assert c.log_every == 100


@pytest.mark.parametrize("variant, steps, uniform_after, cfg, start", [
    ("xl1_64ep", 80_000, 0, 10.0, 0.10),       # FID 2.11 release
    ("xl1_800ep", 1_000_000, 600_000, 6.7, 0.125),  # FID 1.35 release
])
def test_lightningdit_release_settings(variant, steps, uniform_after, cfg, start):
    c = dit_config(variant)
    assert (c.total_steps, c.transport.uniform_time_after) == (steps, uniform_after)
    assert dict(c.sample) == {"method": "euler", "num_steps": 250, "timestep_shift": 0.3,
                              "cfg_scale": cfg, "cfg_interval_start": start,
                              "cfg_channels": 3, "batch_size": 4}


@pytest.mark.parametrize("variant, epochs, disc_start, vf_weight, margins", [
    ("f16d32_vfdinov2", 50, 5001, 0.1, (0.25, 0.5)),
    ("long_stage1", 100, 5001, 0.5, (0.0, 0.0)),
    ("long_stage2", 15, 1, 0.1, (0.0, 0.0)),
    ("long_stage3", 15, 1, 0.1, (0.25, 0.5)),
])
def test_vavae_stages(variant, epochs, disc_start, vf_weight, margins):
    c = vavae_config(variant)
    assert (c.train.epochs, c.total_steps) == (epochs, epochs * 5005)
    assert (c.loss.disc_start, c.loss.vf_weight, c.loss.adaptive_vf) == (disc_start, vf_weight,
                                                                          True)
    assert (c.loss.distmat_margin, c.loss.cos_margin) == margins
    assert (c.loss.kl_weight, c.loss.disc_weight, c.loss.disc_factor, c.loss.disc_loss,
            c.loss.perceptual_weight, c.loss.steps_per_iteration) == (1e-6, 0.5, 1.0, "hinge",
                                                                      1.0, 2)
    assert (c.loss.distmat_weight, c.loss.cos_weight) == (1.0, 1.0)
    assert (c.optimizer.lr, c.optimizer.b1, c.optimizer.b2, c.optimizer.proj_fix) == (
        1e-4, 0.5, 0.9, False)
    assert (c.train.global_batch_size, c.seed, c.model.use_vf) == (256, 23, "dinov2")
    assert (c.data.flip_prob, c.data.preprocess, c.foundation.size,
            c.foundation.imagenet_norm) == (0.0, "random_crop", "L", False)
