"""`python -m launch.convert` and the converter registry (`launch.converters`).

Every registry entry round-trips through upstream files (.pt, .safetensors) and its JAX side on
tiny / random models; every converter module has torchport's four-function protocol; a
`launch.train` workdir exports straight to upstream files that `load_state_dict(strict=True)`
would accept (keys and shapes of the upstream goldens, names and dtypes of the manifests);
user mistakes end in one `error:` line.
"""

import inspect
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import torch
from helpers import REPO, assert_manifest_names, run_module
from safetensors.numpy import load_file

from configs.lightningdit import get_config as dit_config
from configs.vavae import get_config as vavae_config
from launch import params_io
from launch.cli import UserError
from launch.convert import convert
from launch.converters import CONVERTERS, Options
from torchport import load_state_dict, save_state_dict

PROTOCOL = ("torch_rules", "abstract_params", "params_from_torch", "params_to_torch")
CONFIGS = {"dit": "lightningdit", "latent_stats": "lightningdit", "vavae": "vavae",
           "dinov2": "vavae", "discriminator": "vavae"}  # lpips and inception: no config
# configs/vavae.py:tiny reshaped to the goldens: the tiny VA-VAE (five levels, 32 channels)
# and the tiny discriminator (ndf 8, n_layers 3)
VAVAE_GOLDEN_SHAPE = {"model.embed_dim": 32, "model.ddconfig.z_channels": 32,
                      "model.ddconfig.ch_mult": (1, 1, 1, 1, 2),
                      "model.ddconfig.num_res_blocks": 2, "model.ddconfig.resolution": 256,
                      "model.ddconfig.attn_resolutions": (16,), "discriminator.n_layers": 3}


def _config(name):
    family = CONFIGS.get(name)
    return {"lightningdit": dit_config, "vavae": vavae_config}[family]("tiny") if family else None


def _random_tree(abstract, seed=0):
    rng = np.random.default_rng(seed)

    def draw(s):
        if np.issubdtype(s.dtype, np.integer):
            return rng.integers(0, 5, s.shape).astype(s.dtype)
        return rng.standard_normal(s.shape).astype(s.dtype)

    return jax.tree.map(draw, abstract)


def _case(name):
    """(converter, config, model, random tree) of a registry entry, on a tiny model."""
    conv = CONVERTERS[name]
    try:
        conv.protocol()
    except ModuleNotFoundError as e:
        pytest.skip(f"{conv.module} is not there yet ({e})")
    config = _config(name)
    model = conv.build(config, Options())
    return conv, config, model, _random_tree(conv.abstract(model))


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_same_state_dict(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


# -- the protocol and the registry --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_every_converter_has_the_protocol(name, tmp_path):
    conv, _, model, tree = _case(name)
    module = conv.protocol()
    for fn in PROTOCOL:
        params = list(inspect.signature(getattr(module, fn)).parameters)
        assert callable(getattr(module, fn)), (name, fn)
        where = 0 if fn in ("torch_rules", "abstract_params") else 1
        assert params[where] == "model", (name, fn, params)
    _assert_same_tree(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree),
                      module.abstract_params(model))

    state_dict = module.params_to_torch(tree, model)
    rule_keys = [r.torch_key for r in module.torch_rules(model)]
    assert set(rule_keys) <= set(state_dict)  # (inception adds BatchNorm counters)
    save_state_dict(tmp_path / "w.pt", state_dict)
    from_path = module.params_from_torch(str(tmp_path / "w.pt"), model)
    from_mapping = module.params_from_torch(state_dict, model)
    _assert_same_tree(from_path, tree)
    _assert_same_tree(from_mapping, tree)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_every_entry_round_trips_through_files(name, suffix, tmp_path):
    """upstream file -> JAX side (orbax directory / .npz) -> upstream file, all by the CLI."""
    conv, config, model, tree = _case(name)
    src, dst = tmp_path / f"in{suffix}", tmp_path / f"out{suffix}"
    conv.write_torch(str(src), tree, model, Options())
    middle = tmp_path / ("jax" + (conv.native_suffix or ""))
    convert(name, src, middle, config=config)
    convert(name, middle, dst, config=config)
    if middle.is_dir():
        _assert_same_tree(params_io.restore_params(middle, None), tree)
    _assert_same_state_dict(load_state_dict(dst, select=("ema",)),
                            load_state_dict(src, select=("ema",)))
    _assert_same_tree(conv.read_torch(str(dst), model, Options()), tree)


def test_unknown_names_configs_and_paths_are_user_errors(tmp_path):
    conv, config, model, tree = _case("discriminator")
    src = tmp_path / "d.pt"
    conv.write_torch(str(src), tree, model, Options())
    with pytest.raises(UserError, match="unknown converter 'nope'; expected one of dit, vavae"):
        convert("nope", src, tmp_path / "x")
    with pytest.raises(UserError, match="does not exist"):
        convert("discriminator", tmp_path / "missing.pt", tmp_path / "x", config=config)
    with pytest.raises(UserError, match=r"needs a config of configs/vavae\.py; --config is a "
                                        r"'lightningdit' config"):
        convert("discriminator", src, tmp_path / "x", config=dit_config("tiny"))
    with pytest.raises(UserError, match="takes no --config"):
        convert("inception", src, tmp_path / "x", config=config)
    with pytest.raises(UserError, match=r"(?s)cannot load .*d\.pt into NLayerDiscriminator.*"
                                        r"main\.0\.weight: got \(8, 3, 4, 4\)"):
        convert("discriminator", src, tmp_path / "x")  # the upstream ndf=64 model
    with pytest.raises(UserError, match="both on the JAX side"):
        convert("discriminator", tmp_path, tmp_path / "x", config=config)
    with pytest.raises(UserError, match=r"x\.npz: `discriminator` writes no \.npz"):
        convert("discriminator", src, tmp_path / "x.npz", config=config)
    assert not (tmp_path / "x.npz").exists()

    convert("discriminator", src, tmp_path / "params", config=config)
    with pytest.raises(UserError, match=r"exists \(pass --overwrite to replace it\)"):
        convert("discriminator", src, tmp_path / "params", config=config)
    convert("discriminator", src, tmp_path / "params", config=config, overwrite=True)
    wider = vavae_config("tiny")
    wider.discriminator.ndf = 16
    with pytest.raises(UserError, match=r"do not fit the configured model: 13 of another shape, "
                                        r"0 missing, 0 unexpected \(batch_stats/bn3/mean: "
                                        r"\(16,\), expected \(32,\)"):
        convert("discriminator", tmp_path / "params", tmp_path / "d2.pt", config=wider)
    with pytest.raises(UserError, match=r"its folder .*nowhere does not exist"):
        convert("discriminator", src, tmp_path / "nowhere" / "d.pt", config=config)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match=r"text\.pt with torch\.load\(weights_only=True\): not "
                                        r"a torch checkpoint"):
        convert("discriminator", tmp_path / "text.pt", tmp_path / "x", config=config)


@pytest.mark.parametrize("output", ["d.pt", "params"])
def test_an_output_appears_whole_or_not_at_all(output, tmp_path, monkeypatch):
    """A conversion that fails while writing (here: a full disk) leaves no partial file, and
    with --overwrite the previous output stays as it was."""
    from launch import converters

    conv, config, model, tree = _case("discriminator")
    src, dst = tmp_path / "in.pt", tmp_path / output
    conv.write_torch(str(src), tree, model, Options())
    convert("discriminator", src, dst, config=config)
    before = sorted(p.name for p in tmp_path.rglob("*"))

    def full_disk(path, *_):
        if output == "params":  # an orbax directory: one file into it
            os.makedirs(path)
            path = os.path.join(path, "x")
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    if output == "params":
        monkeypatch.setattr(params_io, "save_params", full_disk)
    else:
        monkeypatch.setattr(converters.Converter, "write_torch",
                            lambda self, path, *_: full_disk(path))
    for target in (dst, tmp_path / f"new_{output}"):
        with pytest.raises(OSError, match="No space left"):
            convert("discriminator", src, target, config=config, overwrite=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no new or half file
    monkeypatch.undo()
    if output == "params":
        _assert_same_tree(params_io.restore_params(dst, None), tree)
    else:
        _assert_same_tree(conv.read_torch(str(dst), model, Options()), tree)


def test_params_directories_that_do_not_fit_are_named(tmp_path):
    """`params_io.restore_params` compares the stored names and shapes with the model's before
    reading: another model, another size, or an empty folder is one `UserError`."""
    abstract = {"dense": {"kernel": jax.ShapeDtypeStruct((4, 8), np.float32),
                          "bias": jax.ShapeDtypeStruct((8,), np.float32)}}
    params_io.save_params(tmp_path / "p", _random_tree(abstract))
    restored = params_io.restore_params(tmp_path / "p", abstract)
    assert restored["dense"]["kernel"].shape == (4, 8)
    wider = {"dense": {"kernel": jax.ShapeDtypeStruct((4, 16), np.float32),
                       "bias": jax.ShapeDtypeStruct((16,), np.float32)}}
    with pytest.raises(UserError, match=r"2 of another shape, 0 missing, 0 unexpected "
                                        r"\(dense/bias: \(8,\), expected \(16,\)"):
        params_io.restore_params(tmp_path / "p", wider)
    other = {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3), np.float32)}}
    with pytest.raises(UserError, match=r"no name in common: weights of another model\?\): 0 of "
                                        r"another shape, 1 missing, 2 unexpected"):
        params_io.restore_params(tmp_path / "p", other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty holds no parameters \(not an orbax params "):
        params_io.restore_params(tmp_path / "empty", abstract)


class Payload:
    """Unpickling this would run code (create a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _fails(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "launch.convert", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-2000:]
    return last


def test_cli_errors_are_one_line_and_pickles_never_run(tmp_path):
    assert "unknown converter 'nope'" in _fails("nope", "--input", "a.pt", "--output", "b")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Payload(marker)}, evil)
    line = _fails("latent_stats", "--input", str(evil), "--output", str(tmp_path / "s.npz"))
    assert "refusing to unpickle" in line and "weights_only=True" in line and "open" in line
    assert not marker.exists()


# -- launch.train workdirs -> upstream files ------------------------------------------------------


def assert_strict_loadable(state_dict, reference):
    """What `load_state_dict(strict=True)` checks: exactly the reference keys, same shapes."""
    assert sorted(state_dict) == sorted(reference)
    for key, value in reference.items():
        assert tuple(state_dict[key].shape) == tuple(np.shape(value)), key


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    """A 2-step `launch.train` run of the tiny LightningDiT shaped like the golden
    dit_p2_qknorm0 (32 latent channels)."""
    from launch.data.latents import save_latent_stats, write_latent_shard

    root = tmp_path_factory.mktemp("dit_run")
    rng = np.random.default_rng(0)
    z = rng.normal(size=(32, 32, 8, 8)).astype(np.float32)
    write_latent_shard(str(root / "latents_rank00_shard000.safetensors"), z, z[..., ::-1],
                       rng.integers(0, 10, 32))
    save_latent_stats(str(root / "latents_stats.pt"), np.zeros(32), np.ones(32))
    run_module("launch.train", "--config", "configs/lightningdit.py:tiny", "--workdir",
               str(root / "run"), "--config.total_steps=2", f"--config.data.path={root}",
               "--config.data.prepare=", "--config.sample_every=0",
               "--config.model.in_channels=32")
    return root / "run"


def test_dit_run_exports_ema_and_raw(dit_run, golden, manifest, tmp_path):
    run_module("launch.convert", "dit", "--input", str(dit_run), "--output",
               str(tmp_path / "ema.pt"))
    convert("dit", dit_run, tmp_path / "raw.safetensors", options=Options(raw=True))
    ckpt = torch.load(tmp_path / "ema.pt", weights_only=True)
    assert set(ckpt) == {"model", "ema"}  # what upstream inference.py / train.py read
    ema = {k: v.numpy() for k, v in ckpt["ema"].items()}
    raw = load_file(tmp_path / "raw.safetensors")
    reference = golden("dit_p2_qknorm0").params  # upstream's state dict of this config
    assert list(ema) == list(reference)  # upstream registration order too (.safetensors sorts)
    for exported in (ema, raw):
        assert_strict_loadable(exported, reference)
        assert_manifest_names(exported, manifest("LightningDiT_XL_1")["state_dict"])

    from dit_jax.convert import params_to_torch
    from dit_jax.model import LightningDiT
    from launch import build

    step_dir = params_io.latest_checkpoint(dit_run)
    config = ml_collections.ConfigDict(params_io.run_config(step_dir))
    model = LightningDiT(**build.dit_architecture(config))
    stored_ema = params_io.restore_params(f"{step_dir}/params", None)
    stored_raw = params_io.restore_state_entries(step_dir, ["params"])["params"]
    _assert_same_state_dict(ema, params_to_torch(stored_ema, model))
    _assert_same_state_dict(raw, params_to_torch(stored_raw, model))
    # after 2 steps (adaLN-Zero) the embedders, modulations and final layer have moved
    trained = {k for k in ema if not np.array_equal(ema[k], raw[k])}
    assert {"x_embedder.proj.weight", "final_layer.linear.weight"} <= trained


def test_dit_run_with_another_config_is_a_user_error(dit_run, tmp_path):
    wrong = dit_config("tiny")  # 4 latent channels; the run has 32
    with pytest.raises(UserError, match=r"do not fit the configured model: 3 of another shape.*"
                                        r"x_embedder/kernel: "
                                        r"\(2, 2, 32, 64\), expected \(2, 2, 4, 64\)"):
        convert("dit", dit_run, tmp_path / "x.pt", config=wrong)
    with pytest.raises(UserError, match="is a 'lightningdit' run; `vavae` exports from vavae"):
        convert("vavae", dit_run, tmp_path / "x.pt")
    with pytest.raises(UserError, match="does not hold `lpips` weights"):
        convert("lpips", dit_run, tmp_path / "x.pt")


@pytest.fixture(scope="module")
def vavae_run(tmp_path_factory):
    """A VA-VAE workdir as `launch.train` writes it (the same Checkpointer, items and adapter),
    with random weights instead of training steps."""
    from launch.training.adapters import VAVAEAdapter
    from launch.training.checkpointing import Checkpointer
    from launch.training.loop import config_dict
    from vavae_jax import convert as ae_convert
    from vavae_jax import discriminator
    from vavae_jax.train_step import VAETrainState

    config = vavae_config("tiny")
    for key, value in VAVAE_GOLDEN_SHAPE.items():
        *parents, leaf = key.split(".")
        target = config
        for p in parents:
            target = target[p]
        target[leaf] = value
    adapter = VAVAEAdapter(config)
    models = adapter.models
    ae = _random_tree(ae_convert.abstract_params(models.autoencoder), seed=1)
    disc = _random_tree(discriminator.abstract_params(models.discriminator), seed=2)
    state = VAETrainState(step=np.int32(7), params=ae, opt_state=adapter.ae_opt.init(ae),
                          disc_params=disc["params"], disc_batch_stats=disc["batch_stats"],
                          disc_opt_state=adapter.disc_opt.init(disc["params"]))
    workdir = tmp_path_factory.mktemp("vavae_run")
    checkpointer = Checkpointer(str(workdir), async_save=False)
    checkpointer.save(7, state=state, params=adapter.inference_params(state), data_state={},
                      config=config_dict(config))
    checkpointer.close()
    return workdir, state, models


def test_vavae_run_exports_autoencoder_and_discriminator(vavae_run, golden, manifest, tmp_path):
    from vavae_jax import convert as ae_convert
    from vavae_jax import discriminator

    workdir, state, models = vavae_run
    convert("vavae", workdir, tmp_path / "vae.pt")
    vae = load_state_dict(tmp_path / "vae.pt")
    reference = {**golden("vavae_tiny_params_encoder").params,
                 **golden("vavae_tiny_params_decoder").params}
    assert_strict_loadable(vae, reference)
    assert_manifest_names(vae, manifest("VAVAE_f16d32_inference")["state_dict"])
    inference = {k: v for k, v in state.params.items() if k != "linear_proj"}
    _assert_same_state_dict(vae, ae_convert.params_to_torch(inference, models.autoencoder))

    convert("vavae", workdir, tmp_path / "vae_vf.safetensors", options=Options(keep_vf_proj=True))
    vae_vf = load_file(tmp_path / "vae_vf.safetensors")
    assert set(vae_vf) - set(vae) == {"linear_proj.weight"}
    assert vae_vf["linear_proj.weight"].shape == (32, 32, 1, 1)  # (DINOv2 width, z channels)

    convert("discriminator", workdir, tmp_path / "disc.pt")
    disc = load_state_dict(tmp_path / "disc.pt")
    assert_strict_loadable(disc, golden("discriminator_tiny").params)
    training = manifest("VAVAE_f16d32_vfdinov2_training")["state_dict"]
    assert_manifest_names(disc, training, prefix="loss.discriminator.")
    assert list(disc) == [e["key"].removeprefix("loss.discriminator.") for e in training
                          if e["key"].startswith("loss.discriminator.")]
    want = discriminator.params_to_torch(
        {"params": state.disc_params, "batch_stats": state.disc_batch_stats},
        models.discriminator)
    _assert_same_state_dict(disc, want)

    with pytest.raises(UserError, match="does not hold `dinov2` weights"):
        convert("dinov2", workdir, tmp_path / "dino.pt")
