"""Latent shards in upstream's layout: reading (ours and upstream-written), statistics, the
LightningDiT latent pipeline (flip choice, normalisation, per-process slices, resume)."""

import numpy as np
import pytest
import torch
from ml_collections import ConfigDict
from safetensors.torch import save_file as torch_save_file

from configs.lightningdit import get_config
from launch.data.latents import (
    LatentShardSource,
    compute_latent_stats,
    load_or_compute_stats,
    make_latent_iterator,
    save_latent_stats,
    write_latent_shard,
)
from launch.data.sources import DataError

C, H = 4, 2


def shards(tmp_path, sizes=(5, 7, 4)):
    """Shards whose label is the global row index; latents_flip = -latents (easy to tell)."""
    rng = np.random.default_rng(0)
    start, all_latents = 0, []
    for s, n in enumerate(sizes):
        z = rng.normal(3.0, 2.0, (n, C, H, H)).astype(np.float32)
        write_latent_shard(str(tmp_path / f"latents_rank00_shard{s:03d}.safetensors"), z, -z,
                           np.arange(start, start + n))
        start += n
        all_latents.append(z)
    return np.concatenate(all_latents)


def data(path, **overrides) -> ConfigDict:
    config = get_config("tiny").data
    config.update(path=str(path), worker_count=0, read_threads=2, prefetch=2)
    config.update(**overrides)
    return config


def test_source_reads_our_and_upstream_shards(tmp_path):
    z = shards(tmp_path)
    # a shard as upstream's extract_features.py writes it (torch tensors + string metadata)
    extra = torch.randn(3, C, H, H)
    torch_save_file({"latents": extra, "latents_flip": extra.flip(-1),
                     "labels": torch.tensor([16, 17, 18])},
                    str(tmp_path / "latents_rank01_shard000.safetensors"),
                    metadata={"total_size": "3", "dtype": "torch.float32", "device": "cuda:1"})
    src = LatentShardSource(str(tmp_path))
    assert len(src) == 19 and src.latent_shape == (C, H, H)
    np.testing.assert_array_equal(src.read(6, "latents"), z[6])
    np.testing.assert_array_equal(src.read(17, "latents_flip"), extra[1].flip(-1).numpy())
    assert src.describe(12).endswith("latents_rank00_shard002.safetensors#0")
    np.testing.assert_array_equal(src.labels(), np.arange(19))


def test_stats_equal_numpy_and_round_trip_pt(tmp_path):
    z = shards(tmp_path)
    src = LatentShardSource(str(tmp_path))
    mean, std = compute_latent_stats(src)
    np.testing.assert_allclose(mean, z.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(std, z.std(axis=(0, 2, 3), ddof=1), rtol=1e-6)
    save_latent_stats(str(tmp_path / "latents_stats.pt"), mean, std)
    saved = torch.load(tmp_path / "latents_stats.pt", weights_only=True)
    assert saved["mean"].shape == (1, C, 1, 1) and saved["std"].dtype == torch.float32
    got_mean, got_std = load_or_compute_stats(src)
    np.testing.assert_array_equal(got_mean, mean)
    sub_mean, _ = compute_latent_stats(src, num_images=10, seed=1)  # a seeded random subset
    assert not np.allclose(sub_mean, mean)


def test_pipeline_normalises_and_picks_views(tmp_path):
    z = shards(tmp_path)
    mean = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    std = np.array([2.0, 0.5, 1.0, 4.0], np.float32)
    save_latent_stats(str(tmp_path / "latents_stats.pt"), mean, std)
    it = make_latent_iterator(data(tmp_path, latent_multiplier=0.5), global_batch_size=4,
                              seed=0, num_classes=16, latent_size=H, channels=C)
    views = []
    for _ in range(8):
        batch = next(it)
        assert batch["latents"].shape == (4, H, H, C) and batch["latents"].dtype == np.float32
        for x, label in zip(batch["latents"], batch["labels"]):
            plain = (z[label].transpose(1, 2, 0) - mean) / std * np.float32(0.5)
            mirror = (-z[label].transpose(1, 2, 0) - mean) / std * np.float32(0.5)
            if np.array_equal(x, plain):
                views.append(0)
            else:
                np.testing.assert_array_equal(x, mirror)
                views.append(1)
    it.close()
    assert 0.3 < np.mean(views) < 0.7  # p = 0.5 per sample
    no_flip = make_latent_iterator(data(tmp_path, flip=False, latent_norm=False),
                                   global_batch_size=4, seed=0)
    batch = next(no_flip)
    no_flip.close()
    np.testing.assert_array_equal(batch["latents"], z[batch["labels"]].transpose(0, 2, 3, 1))


def test_slices_and_resume(tmp_path):
    shards(tmp_path)
    cfg = data(tmp_path)
    full = make_latent_iterator(cfg, global_batch_size=4, seed=2)
    batches = [next(full) for _ in range(6)]
    state = full.get_state()
    after = next(full)
    full.close()
    for p in range(2):
        part = make_latent_iterator(cfg, global_batch_size=4, seed=2, process_index=p,
                                    process_count=2)
        got = [next(part) for _ in range(6)]
        part.set_state(state)
        resumed = next(part)
        part.close()
        for g, b in zip(got + [resumed], batches + [after]):
            np.testing.assert_array_equal(g["latents"], b["latents"][2 * p : 2 * p + 2])
            np.testing.assert_array_equal(g["labels"], b["labels"][2 * p : 2 * p + 2])


def test_latent_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        LatentShardSource(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no \\*.safetensors"):
        LatentShardSource(str(tmp_path))
    shards(tmp_path)
    with pytest.raises(DataError, match=r"labels span \[0, 15\], the model has num_classes=10"):
        make_latent_iterator(data(tmp_path), global_batch_size=4, seed=0, num_classes=10)
    with pytest.raises(DataError, match=r"\(C, H, W\) = \(4, 2, 2\), the model expects"):
        make_latent_iterator(data(tmp_path), global_batch_size=4, seed=0, channels=32)
    torch_save_file({"latents": torch.zeros(2, C, H, H), "labels": torch.zeros(2)},
                    str(tmp_path / "zz.safetensors"))
    with pytest.raises(DataError, match=r"zz.safetensors: missing \['latents_flip'\]"):
        LatentShardSource(str(tmp_path))
    torch_save_file({"latents": torch.zeros(2, C, H), "latents_flip": torch.zeros(2, C, H),
                     "labels": torch.zeros(2, dtype=torch.int64)}, str(tmp_path / "zz.safetensors"))
    with pytest.raises(DataError, match=r"zz.safetensors: inconsistent shapes .*\(N, C, H, W\)"):
        LatentShardSource(str(tmp_path))
    shard = tmp_path / "latents_rank00_shard000.safetensors"
    with pytest.raises(DataError, match="is a file"):
        LatentShardSource(str(shard))
    with pytest.raises(DataError, match="is a URL"):
        LatentShardSource("gs://bucket/latents")
    (tmp_path / "zz.safetensors").unlink()
    shard.write_bytes(shard.read_bytes()[:-50])  # a partial copy
    with pytest.raises(DataError, match=r"shard000.safetensors: not a readable safetensors"):
        LatentShardSource(str(tmp_path))


def test_our_shards_read_as_upstream_reads_them(tmp_path):
    """Upstream's ImgLatentDataset opens shards with framework="pt" and slices rows."""
    from safetensors import safe_open

    z = shards(tmp_path, sizes=(3,))
    with safe_open(str(tmp_path / "latents_rank00_shard000.safetensors"), framework="pt",
                   device="cpu") as f:
        assert f.metadata() == {"total_size": "3", "dtype": "torch.float32", "device": "cpu"}
        feature = f.get_slice("latents")[1:2]
        label = f.get_slice("labels")[1:2]
    assert feature.dtype == torch.float32 and tuple(feature.shape) == (1, C, H, H)
    assert label.dtype == torch.int64 and int(label) == 1
    np.testing.assert_array_equal(feature[0].numpy(), z[1])
