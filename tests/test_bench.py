"""Smoke tests of the side-by-side benchmarks (bench/): each entry point runs on tiny models and
prints one JSON object as its last line; the explicit FLOP count matches the paper's figure and
XLA's cost analysis. No timing assertions."""

import argparse
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from bench import ab, compare, precision_recall, profile_step, sample, train_memory, train_step, vae
from bench.common import cost_flops
from bench.flops import lightningdit_forward_flops, matmul_flops
from dit_jax import RELEASED_FLAGS, LightningDiT, lightningdit_kwargs

TRAIN_KEYS = {"images_per_s", "tflops_per_s", "mfu", "peak_memory_gb", "compile_s", "dtype",
              "device", "flops_per_image", "xla_flops_per_image", "peak_tflops", "peak_source"}


def last_json(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


def test_xl1_forward_flops_is_237_gflop():
    kwargs = lightningdit_kwargs("LightningDiT-XL/1", **RELEASED_FLAGS)
    assert lightningdit_forward_flops(kwargs, 256) == pytest.approx(237e9, rel=0.01)
    assert lightningdit_forward_flops(kwargs) == lightningdit_forward_flops(kwargs, 256)


@pytest.mark.parametrize("flags", [dict(RELEASED_FLAGS), dict(in_channels=4, learn_sigma=True)])
def test_forward_flops_match_xla_cost_analysis(flags):
    kwargs = {**flags, "input_size": 8, "patch_size": 1, "hidden_size": 256, "depth": 2,
              "num_heads": 4, "num_classes": 10}
    model = LightningDiT(**kwargs)
    c = kwargs["in_channels"]
    args = (jax.ShapeDtypeStruct((1, 8, 8, c), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32))
    params = jax.eval_shape(model.init, jax.random.key(0), *args)
    forward = lambda p, x, t, y: model.apply(p, x, t, y)
    explicit = lightningdit_forward_flops(kwargs)
    assert explicit == pytest.approx(cost_flops(jax.jit(forward).lower(params, *args)),
                                     rel=0.05)
    assert explicit == pytest.approx(matmul_flops(forward, params, *args), rel=1e-6)


def test_train_step_lightningdit(capsys):
    train_step.main(["--model", "lightningdit", "--variant", "tiny", "--batch", "4",
                     "--steps", "1", "--warmup", "0", "--peak_matmul_n", "256"])
    r = last_json(capsys)
    assert TRAIN_KEYS <= set(r)
    assert r["dtype"] == "float32" and r["peak_source"] == "measured f32 matmul"
    assert r["images_per_s"] > 0 and r["mfu"] > 0 and r["peak_memory_gb"] > 0
    assert r["step_min_s"] <= min(r["step_s"], r["step_mean_s"]) <= r["step_max_s"]
    assert r["flops_per_image"] == pytest.approx(r["xla_flops_per_image"], rel=0.25)
    from launch import host_memory

    # main asked; in this (pytest) process it never restarts
    assert r["huge_pages"] == host_memory.status() == "off: not a launch / bench command"


def test_profile_step_shares_the_wall_time_out(capsys):
    profile_step.main(["--model", "lightningdit", "--variant", "tiny", "--batch", "4",
                       "--top", "50", "--top_ops", "100000"])
    r = last_json(capsys)
    assert r["bench"] == "profile_step" and r["wall_s"] > 0
    # one traced step: the shares and the gaps make up its wall time
    assert sum(r["attributed_s"].values()) + r["idle_s"] == pytest.approx(r["wall_s"], rel=1e-6)
    # every op is listed: the groups of each kind add up to that kind's share
    for kind, seconds in r["attributed_s"].items():
        groups = r["dots"] if kind == "dot" else [o for o in r["ops"] if o["kind"] == kind]
        assert sum(g["wall_s"] for g in groups) == pytest.approx(seconds, rel=1e-6)
    wheres = {o["label"].split(" ", 1)[1] for o in r["ops"]}
    assert any(w.startswith("backward blocks_*/") for w in wheres)
    assert any(w.startswith("forward blocks_*/") for w in wheres)
    assert r["attributed_s"]["dot"] > 0 and r["dots"]
    assert r["peak_tflops"] > 0
    for d in r["dots"]:  # a share of a group's own time, and its asynchronous ops counted
        assert d["busy_s"] >= d["wall_s"] * (1 - 1e-9) and 0 <= d["overlapped"] < 1
        assert 0 <= d["async"] <= d["count"]
    assert {d["label"].split(" ")[0] for d in r["dots"]} >= {"qkv", "proj", "w12", "w3"}
    # the dots found in the compiled step are the model's matmuls: 3 x forward per image
    built = train_step.compiled_step("lightningdit", "tiny", 4)
    explicit, _ = train_step.explicit_flops_per_image("lightningdit", built["adapter"],
                                                      built["state"])
    assert r["dot_flops"] == pytest.approx(4 * explicit, rel=0.1)


def test_profile_guided_call_shares_its_wall_time_out(capsys):
    profile_step.main(["--what", "guided", "--variant", "tiny", "--batch", "4", "--steps", "2",
                       "--top", "50", "--top_ops", "100000"])
    r = last_json(capsys)
    assert r["what"] == "guided" and r["batch"] == 4 and r["wall_s"] > 0
    assert sum(r["attributed_s"].values()) + r["idle_s"] == pytest.approx(r["wall_s"], rel=1e-6)
    assert {d["label"].split(" ")[0] for d in r["dots"]} >= {"qkv", "proj", "w12", "w3"}
    # the executed branch at t = 0.5 (inside the guidance interval) runs all 4 rows forward
    built = sample.guided_call("tiny", 4)
    assert r["dot_flops"] == pytest.approx(built["flops_per_call"], rel=0.1)
    with pytest.raises(SystemExit, match="--what guided: a LightningDiT call"):
        profile_step.main(["--what", "guided", "--model", "vavae"])


def test_profile_classifies_the_module_first_computation():
    """The module header line ends in "}", not "{": it must not swallow the first computation
    (a dot fusion here), which was then counted as elementwise."""
    hlo = (
        "HloModule jit_f, entry_computation_layout={(f32[4,4]{1,0})->f32[4,4]{1,0}}\n\n"
        "%fused_computation (param_0: f32[4,4]) -> f32[4,4] {\n"
        "  %param_0 = f32[4,4]{1,0} parameter(0)\n"
        "  ROOT %dot.0 = f32[4,4]{1,0} dot(%param_0, %param_0), lhs_contracting_dims={1}, "
        "rhs_contracting_dims={0}\n}\n\n"
        "ENTRY %main.1 (a.1: f32[4,4]) -> f32[4,4] {\n"
        "  %a.1 = f32[4,4]{1,0} parameter(0)\n"
        "  ROOT %ynn_fusion = f32[4,4]{1,0} fusion(%a.1), kind=kCustom, "
        "calls=%fused_computation\n}\n")
    table = profile_step.classify_hlo(hlo)
    assert table["ynn_fusion"][0] == "dot" and table["ynn_fusion"][2] == 2 * 4 * 4 * 4


def test_profile_counts_convolution_flops_as_executed():
    """Each output element takes the kernel's window x input features, whatever the layout
    letters say, inside a fusion or not (the dispatch test of `spans` needs them)."""
    conv = ("convolution(%x.1, %k.1), window={size=3x3 pad=1_1x1_1}, "
            "dim_labels=b01f_01io->b01f")
    hlo = (
        "%fused_conv (x.1: f32[2,8,8,4], k.1: f32[3,3,4,16]) -> f32[2,8,8,16] {\n"
        "  %x.1 = f32[2,8,8,4]{3,2,1,0} parameter(0)\n"
        "  %k.1 = f32[3,3,4,16]{3,2,1,0} parameter(1)\n"
        f"  ROOT %conv.1 = f32[2,8,8,16]{{3,2,1,0}} {conv}\n}}\n\n"
        "ENTRY %main.2 (a.2: f32[2,8,8,4], b.2: f32[16,3,3,4]) -> f32[2,8,8,16] {\n"
        "  %a.2 = f32[2,8,8,4]{3,2,1,0} parameter(0)\n"
        "  %b.2 = f32[16,3,3,4]{3,2,1,0} parameter(1)\n"
        "  %conv.3 = f32[2,8,8,16]{3,2,1,0} convolution(%a.2, %b.2), window={size=3x3 "
        "pad=1_1x1_1}, dim_labels=b01f_o01i->b01f\n"
        "  ROOT %fusion.4 = f32[2,8,8,16]{3,2,1,0} fusion(%a.2, %b.2), kind=kOutput, "
        "calls=%fused_conv\n}\n")
    table = profile_step.classify_hlo(hlo)
    flops = 2 * (2 * 8 * 8 * 16) * (3 * 3 * 4)
    assert table["conv.3"] == ("convolution", "f32[2,8,8,16] ?", flops)
    assert table["fusion.4"][0] == "convolution" and table["fusion.4"][2] == flops


def test_profile_names_where_an_op_comes_from():
    def line(op_name):
        return f'  %f.1 = f32[8]{{0}} fusion(%a), kind=kLoop, metadata={{op_name="{op_name}"}}'

    where = profile_step._where
    assert where(line("jit(step)/transpose(jvp(LightningDiT))/blocks_11/attn/stack")) == \
        "backward blocks_*/attn/stack"
    assert where(line("jit(step)/jvp(LightningDiT)/blocks_0/mlp/w12/convert_element_type")) \
        == "forward blocks_*/mlp/w12/convert_element_type"
    assert where(line("jit(step)/add")) == "add"  # the optimizer, outside the model's passes
    assert where("  %f.1 = f32[8]{0} fusion(%a), kind=kLoop") == "?"


def test_profile_extends_only_dots_that_returned_before_their_work():
    """An asynchronous dot's event ends at dispatch: its span runs to its completion mark or
    its first reader's start, whichever is first; other events keep theirs, however late
    their marks (a thread logs a mark after whatever it ran next)."""
    def ev(name, ts, dur=0.0):
        return {"name": name, "ts": ts, "dur": dur}

    raw = [ev("dot.1", 0, 2), ev("fusion.2", 10, 5), ev("end: fusion.2", 15),
           ev("fusion.3", 50, 4), ev("end: dot.1", 60), ev("end: fusion.3", 70),
           ev("dot.4", 100, 1), ev("end: dot.4", 130), ev("copy.5", 200, 3),
           ev("end: copy.5", 400), ev("dot.6", 500, 1)]
    reader_map = {"dot.1": {"fusion.3"}, "dot.4": {"fusion.9"}, "copy.5": {"fusion.3"}}
    dispatch_only = lambda e: e["name"].startswith("dot.")
    got = {name: (round(start * 1e6, 6), round(end * 1e6, 6), extended)
           for start, end, name, extended in profile_step.spans(raw, reader_map, dispatch_only)}
    assert got == {"dot.1": (0, 50, True),  # its reader started before its mark
                   "fusion.2": (10, 15, False), "fusion.3": (50, 54, False),
                   "dot.4": (100, 130, True),  # no reader ran: its mark
                   "copy.5": (200, 203, False),  # not a dispatch: the late mark is ignored
                   "dot.6": (500, 501, True)}  # neither: the event itself


def test_profile_readers_look_through_bitcasts_and_tuples():
    hlo = (
        "ENTRY %main.1 (a.1: f32[4,4]) -> f32[4,4] {\n"
        "  %a.1 = f32[4,4]{1,0} parameter(0)\n"
        "  %dot.2 = f32[4,4]{1,0} dot(%a.1, %a.1), lhs_contracting_dims={1}, "
        "rhs_contracting_dims={0}\n"
        "  %bitcast.3 = f32[16]{0} bitcast(%dot.2)\n"
        "  %tuple.4 = (f32[16]{0}) tuple(%bitcast.3)\n"
        "  %get-tuple-element.5 = f32[16]{0} get-tuple-element(%tuple.4), index=0\n"
        "  %fusion.6 = f32[16]{0} fusion(%get-tuple-element.5), kind=kLoop, calls=%f\n"
        "  ROOT %add.7 = f32[4,4]{1,0} add(%dot.2, %a.1)\n}\n")
    reader_map = profile_step.readers(hlo)
    assert reader_map["dot.2"] == {"fusion.6", "add.7"}
    assert reader_map["a.1"] == {"dot.2", "add.7"} and reader_map["add.7"] == set()


def test_profile_attribution_shares_overlaps():
    events = [(0.0, 2.0, "a"), (1.0, 3.0, "b"), (5.0, 6.0, "a")]
    shares, idle = profile_step.attribute(events)
    assert shares == pytest.approx({"a": 2.5, "b": 1.5}) and idle == pytest.approx(2.0)


def test_variant_names():
    assert train_step.dit_variant("B/1") == "LightningDiT-B/1"
    assert train_step.dit_variant("LightningDiT-XL/1") == "LightningDiT-XL/1"
    with pytest.raises(SystemExit):
        train_step.dit_variant("Q/7")


@pytest.mark.slow  # ~40 s of XLA compilation on CPU
def test_train_step_vavae(capsys):
    train_step.main(["--model", "vavae", "--variant", "tiny", "--steps", "1", "--warmup", "0",
                     "--peak_matmul_n", "256", "--remat"])
    r = last_json(capsys)
    assert TRAIN_KEYS <= set(r) and r["images_per_s"] > 0 and r["remat"]


def test_sample(capsys):
    sample.main(["--variant", "tiny", "--batch", "4", "--steps", "1", "--warmup", "0",
                 "--num_steps", "10"])
    r = last_json(capsys)
    assert {"calls_per_s", "sample_s", "compile_s", "device"} <= set(r)
    assert r["cfg_scale"] == 6.7 and r["cfg_channels"] == 3 and r["num_steps"] == 10
    # shift 0.3 puts 3 of the 9 calls before the interval (t < 0.125): conditional half only
    assert r["conditional_only_calls"] == 3
    assert r["sample_flops_both_halves"] == 9 * r["flops_per_call"]
    assert r["sample_flops"] == 6 * r["flops_per_call"] + 3 * r["flops_per_call"] // 2


def test_vae(capsys):
    vae.main(["--variant", "tiny", "--size", "32", "--steps", "1", "--warmup", "0"])
    r = last_json(capsys)
    assert {"encode_s", "decode_s", "compile_s", "device"} <= set(r)
    assert r["latent_shape"] == [8, 8, 4]


def test_precision_recall(capsys):
    from eval_jax import metrics

    for distances in ("float16", "float32"):
        precision_recall.main(["--num_real", "40", "--num_fake", "30", "--dim", "16",
                               "--distances", distances, "--steps", "1", "--warmup", "0"])
        r = last_json(capsys)
        assert {"seconds", "tflops_per_s", "device"} <= set(r)
        assert r["distance_flops"] == 2 * 16 * (40 * 40 + 30 * 30 + 40 * 30)
        want = metrics.precision_recall(precision_recall.features(40, 16, 0),
                                        precision_recall.features(30, 16, 1), distances=distances)
        assert (r["precision"], r["recall"]) == want


def test_conv_grad(capsys):
    from bench import conv_grad

    conv_grad.main(["--layers", "tiny", "--steps", "1", "--warmup", "0"])
    r = last_json(capsys)
    assert r["bench"] == "conv_grad" and len(r["results"]) == len(conv_grad.LAYERS["tiny"])
    for layer in r["results"]:
        assert layer["max_rel_diff"] < 1e-5  # the same gradient, computed another way
        assert layer["ratio"] == pytest.approx(layer["xla_kernel_grad_s"]
                                               / layer["ours_kernel_grad_s"])


FAKE_BENCH_CPU = """
    import argparse, json
    p = argparse.ArgumentParser()
    p.add_argument("--what"); p.add_argument("--compile", action="store_true")
    p.add_argument("--warmup"); p.add_argument("--repeats"); p.add_argument("--batch")
    a = p.parse_args()
    if a.compile:
        raise SystemExit("inductor unavailable")
    t = dict(median_s=0.5, min_s=0.4, max_s=0.6)
    print("noise")
    print(json.dumps(dict(encode=t, decode=t) if a.what == "vae" else t))
"""


def test_compare_with_a_stub_upstream(capsys, tmp_path):
    stub = tmp_path / "bench_cpu.py"
    stub.write_text(textwrap.dedent(FAKE_BENCH_CPU))
    compare.main(["--what", "sample_b1,vae", "--tiny", "--steps", "1", "--warmup", "0",
                  "--refenv_python", sys.executable, "--upstream_dir", str(tmp_path),
                  "--bench_cpu", str(stub)])
    r = last_json(capsys)
    assert r["bench"] == "compare" and set(r["results"]) == {"sample_b1", "vae"}
    peaks = r["matmul_peak_tflops"]  # both libraries really timed (torch: this venv's)
    assert set(peaks) == {"xla", "torch"} and peaks["torch"]["float32"] > 0
    for what, upstream_s in (("sample_b1", 0.5), ("vae", 1.0)):
        res = r["results"][what]
        assert res["upstream_best"] == "eager" and "upstream_compile_error" in res
        assert res["ratio"] == pytest.approx(upstream_s / res["ours_s"])
        assert res["flops_per_call"] > 0
        assert res["upstream_fraction_of_torch_peak"] == pytest.approx(
            res["flops_per_call"] / upstream_s / 1e12 / peaks["torch"]["float32"])
        assert res["ours_fraction_of_xla_peak"] == pytest.approx(
            res["flops_per_call"] / res["ours_s"] / 1e12 / peaks["xla"]["float32"])


def test_torch_matmul_shrinks_where_a_dtype_is_slow():
    """A dtype without a fast kernel (bf16 on an AVX2 CPU: minutes per 2048^3 matmul) is timed
    at a size that fits --max_seconds, and the JSON says which."""
    import subprocess

    script = str(compare.TORCH_MATMUL_SCRIPT)
    for budget, size in (("600", 512), ("1e-9", 128)):
        out = subprocess.run([sys.executable, script, "--n", "512", "--dtypes", "float32",
                              "--repeats", "1", "--max_seconds", budget],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        assert r["sizes"] == {"float32": size} and r["tflops"]["float32"] > 0


FAKE_AUTOCAST = """
    import argparse, json
    p = argparse.ArgumentParser()
    p.add_argument("--what"); p.add_argument("--compile", action="store_true")
    p.add_argument("--warmup"); p.add_argument("--repeats"); p.add_argument("--batch")
    p.add_argument("--shared", required=True); p.add_argument("--upstream_dir", required=True)
    p.add_argument("--dtype", choices=["bfloat16"], required=True)
    a = p.parse_args()
    print(json.dumps(dict(median_s=0.25, min_s=0.2, max_s=0.3, dtype="bfloat16 autocast")))
"""


def test_compare_bfloat16_runs_upstream_under_autocast(capsys, tmp_path, monkeypatch):
    """--dtype bfloat16: the guided call goes to the autocast runner (upstream in bf16) and
    ours runs in bfloat16; the VA-VAE stays float32 on both sides."""
    stub, autocast = tmp_path / "bench_cpu.py", tmp_path / "autocast.py"
    stub.write_text(textwrap.dedent(FAKE_BENCH_CPU))
    autocast.write_text(textwrap.dedent(FAKE_AUTOCAST))
    monkeypatch.setattr(compare, "UPSTREAM_TORCH_SCRIPT", autocast)
    broken = tmp_path / "torch_matmul.py"
    broken.write_text("raise SystemExit('no torch here')")
    monkeypatch.setattr(compare, "TORCH_MATMUL_SCRIPT", broken)
    compare.main(["--what", "sample_b1,vae", "--tiny", "--steps", "1", "--warmup", "0",
                  "--dtype", "bfloat16", "--skip_compile", "--refenv_python", sys.executable,
                  "--upstream_dir", str(tmp_path), "--bench_cpu", str(stub)])
    out = capsys.readouterr().out
    r = json.loads(out.strip().splitlines()[-1])
    assert "torch's peak not measured" in out and "no torch here" in out
    assert r["dtype"] == "bfloat16"
    assert r["results"]["sample_b1"]["dtype"] == "bfloat16"
    assert r["results"]["sample_b1"]["upstream_eager_s"] == 0.25
    assert r["results"]["vae"]["dtype"] == "float32"
    assert r["results"]["vae"]["upstream_eager_s"] == 1.0
    # torch's peak failed: said so, ours is still given against XLA's float32 and bf16 peaks
    assert set(r["matmul_peak_tflops"]) == {"xla"}
    assert set(r["matmul_peak_tflops"]["xla"]) == {"float32", "bfloat16"}
    for res in r["results"].values():
        assert "upstream_fraction_of_torch_peak" not in res and res["ours_fraction_of_xla_peak"] > 0


FAKE_SAMPLE_RUN = """
    import argparse, json
    p = argparse.ArgumentParser()
    p.add_argument("--what", choices=["sample_run_b1"]); p.add_argument("--num_steps")
    p.add_argument("--warmup"); p.add_argument("--repeats"); p.add_argument("--batch")
    p.add_argument("--shared"); p.add_argument("--upstream_dir"); p.add_argument("--dtype")
    a = p.parse_args()
    print(json.dumps(dict(median_s=2.0, min_s=2.0, max_s=2.0, num_steps=int(a.num_steps),
                          repeats=int(a.repeats))))
"""


def test_compare_whole_sample(capsys, tmp_path, monkeypatch):
    """sample_run_b1: upstream's whole sample (upstream_torch.py, one timed sample of
    --sample_steps grid points) against ours; upstream's share of peak counts both halves at
    every call, ours only what runs."""
    runner = tmp_path / "upstream_torch.py"
    runner.write_text(textwrap.dedent(FAKE_SAMPLE_RUN))
    (tmp_path / "b.py").write_text("")
    monkeypatch.setattr(compare, "UPSTREAM_TORCH_SCRIPT", runner)
    compare.main(["--what", "sample_run_b1", "--tiny", "--steps", "3", "--warmup", "0",
                  "--sample_steps", "10", "--skip_compile", "--refenv_python", sys.executable,
                  "--upstream_dir", str(tmp_path), "--bench_cpu", str(tmp_path / "b.py")])
    out = capsys.readouterr().out
    assert f"{runner} --what sample_run_b1" in out and "--repeats 1" in out
    assert "--num_steps 10" in out
    r = json.loads(out.strip().splitlines()[-1])
    res = r["results"]["sample_run_b1"]
    assert res["upstream_eager_s"] == 2.0 and res["target"] == 2.0
    assert res["ratio"] == pytest.approx(2.0 / res["ours_s"])
    torch_peak = r["matmul_peak_tflops"]["torch"]["float32"]
    both_halves = res["flops_per_call"] / (6 + 3 / 2) * 9  # 3 of 9 calls ran half the batch
    assert res["upstream_fraction_of_torch_peak"] == pytest.approx(
        both_halves / 2.0 / 1e12 / torch_peak, rel=1e-6)


def test_compare_explains_missing_setup(capsys, tmp_path):
    with pytest.raises(SystemExit):
        compare.main(["--refenv_python", str(tmp_path / "nope"), "--upstream_dir",
                      str(tmp_path)])
    captured = capsys.readouterr()
    assert "setup_refenv.sh" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["error"]


def test_compare_times_upstream_train_step_with_its_ema_by_default():
    """train_b1 is compared like for like: train.py updates its EMA every step and so does our
    step, so upstream runs through upstream_torch.py --ema unless --no-upstream_ema."""
    import argparse

    def command(what, **overrides):
        args = argparse.Namespace(refenv_python="py", upstream_dir="/up", warmup=1, steps=3,
                                  bench_cpu="/t/bench_cpu.py", dtype="float32",
                                  upstream_ema=True)
        vars(args).update(overrides)
        return compare.upstream_command(what, False, args)

    cmd = command("train_b1")
    assert cmd[1] == str(compare.UPSTREAM_TORCH_SCRIPT) and "--ema" in cmd
    assert cmd[cmd.index("--dtype") + 1] == "float32" and cmd[cmd.index("--batch") + 1] == "8"
    assert command("train_b1", upstream_ema=False)[1] == "/t/bench_cpu.py"
    bf16 = command("train_b1", dtype="bfloat16")
    assert bf16[1] == str(compare.UPSTREAM_TORCH_SCRIPT) and "--ema" in bf16
    assert "--ema" not in command("train_b1", dtype="bfloat16", upstream_ema=False)
    for what in ("sample_b1", "vae"):  # no EMA in inference; float32 stays bench_cpu.py
        cmd = command(what)
        assert cmd[1] == "/t/bench_cpu.py" and "--ema" not in cmd
    assert "--ema" not in command("sample_b1", dtype="bfloat16")


FAKE_UPSTREAM_ENV = """
    import json, os
    t = dict(median_s=0.5, min_s=0.5, max_s=0.5, tunables=os.environ.get("GLIBC_TUNABLES"))
    print(json.dumps(t))
"""


def test_compare_gives_upstream_the_huge_page_tunable_only_on_request(tmp_path, monkeypatch):
    import argparse

    from launch import host_memory

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    stub = tmp_path / "bench_cpu.py"
    stub.write_text(textwrap.dedent(FAKE_UPSTREAM_ENV))
    for setting, tunables in ((False, None), (True, host_memory.TUNABLE)):
        args = argparse.Namespace(refenv_python=sys.executable, upstream_dir=str(tmp_path),
                                  warmup=0, steps=1, bench_cpu=str(stub), dtype="float32",
                                  upstream_ema=True, upstream_timeout=60,
                                  upstream_huge_pages=setting)
        assert compare.run_upstream("sample_b1", False, args)["raw"]["tunables"] == tunables


def test_collectives_counts_and_equal_losses():
    from bench import collectives

    hlo = """
  %all-gather-start.1 = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(%p), dimensions={0}
  %all-gather-done.1 = f32[16,8]{1,0} all-gather-done(%all-gather-start.1)
  ROOT %all-reduce.2 = bf16[10]{0} all-reduce(%x), to_apply=%add
"""
    found = collectives.count_collectives(hlo)
    assert found["all-gather"] == {"count": 1, "bytes": 16 * 8 * 4}  # the gathered result
    assert found["all-reduce"] == {"count": 1, "bytes": 20}
    rows = collectives.run("tiny", 8, meshes=({"data": 2}, {"fsdp": 4}))
    assert [r["loss"] for r in rows[1:]] == pytest.approx([rows[0]["loss"]] * 2, rel=1e-5)
    assert "all-reduce" in rows[1]["collectives"]  # data parallel: gradients all-reduced
    assert "all-gather" in rows[2]["collectives"]  # fsdp: parameters all-gathered


def test_train_step_knows_the_demo_s_models():
    from configs import lightningdit, vavae

    # `--variant demo` benchmarks what launch.demo trains, of either family
    want = lightningdit.get_config("demo").model
    want.dtype = "bfloat16"
    assert train_step.dit_config("demo", "bfloat16").model == want
    assert train_step.dit_variant("demo") == "demo"
    assert train_step.vavae_config("demo", "float32").model == vavae.get_config("demo").model
    with pytest.raises(SystemExit, match="tiny, demo or one of"):
        train_step.dit_variant("Z/9")


def test_attention_option_reaches_the_model_and_keeps_values():
    from bench import common
    from launch import build
    from launch.cli import UserError

    config = train_step.dit_config("tiny", "float32")
    config.model.attention_impl = "xla"
    model = build.dit_model(config)
    assert model.attention_impl == "xla"
    assert "attention_impl" not in build.dit_architecture(config)  # runtime only
    s, c = model.input_size, model.in_channels
    x, t = jax.random.normal(jax.random.key(0), (2, s, s, c)), jnp.full((2,), 0.3)
    y = jnp.array([1, 2])
    params = model.init(jax.random.key(1), x, t, y)
    outputs, programs = {}, {}
    for impl in ("explicit", "xla"):
        m = model.clone(attention_impl=impl)
        forward = jax.jit(lambda p, m=m: m.apply(p, x, t, y))
        programs[impl] = forward.lower(params).as_text()
        outputs[impl] = forward(params)
    assert programs["explicit"] != programs["xla"]
    assert jnp.allclose(outputs["explicit"], outputs["xla"], rtol=1e-5, atol=1e-5)

    config.model.attention_impl = "flash"
    with pytest.raises(UserError, match="attention_impl 'flash'"):
        build.dit_kwargs(config)
    with pytest.raises(SystemExit, match="cudnn needs a CUDA GPU"):
        common.check_attention("cudnn")


def test_suite_runs_each_part_as_a_process(capsys, tmp_path):
    from bench import suite

    suite.main(["--tiny", "--out", str(tmp_path), "--only", "train,sample,metrics", "--batches",
                "2", "--steps", "1", "--warmup", "0"])
    r = last_json(capsys)
    assert r["runs"] == {"ok": 3, "failed": 0, "timeout": 0, "skipped": 0}
    assert r["train"]["batch"] == 2 and r["train"]["images_per_s"] > 0
    assert r["train"]["memory_gb_per_image"] == pytest.approx(r["train"]["peak_memory_gb"] / 2)
    assert r["sample"]["num_steps"] == 5 and r["sample"]["call_s"] > 0
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [rec["part"] for rec in records] == ["train", "sample", "metrics"]
    assert r["metrics"]["distances"] == "float16" and r["metrics"]["seconds"] > 0
    assert records[0]["result"]["variant"] == "tiny"
    table = (tmp_path / "summary.md").read_text()
    assert "| train | tiny bfloat16 batch 2 | ok |" in table and "img/s" in table


def test_suite_ladder_remat_upstream_and_budget(tmp_path, monkeypatch):
    """Orchestration alone (each run stubbed): batches until the first failure, that batch
    again with --remat, the attention and upstream runs at the largest batch that fitted,
    runs skipped once the budget is spent."""
    from bench import suite

    calls = []
    result = {"step_s": 1.0, "images_per_s": 32.0, "tflops_per_s": 10.0, "mfu": 0.5,
              "peak_memory_gb": 64.0, "median_s": 0.5, "call_s": 0.1, "calls_per_s": 10.0,
              "call_tflops_per_s": 1.0}

    def fake_run(self, part, argv, label):
        calls.append((part, argv))
        record = {"part": part, "label": label, "argv": argv}
        batch = int(argv[argv.index("--batch") + 1]) if "--batch" in argv else 0
        if part == "train" and "--remat" not in argv and batch >= 64:
            record.update(status="failed", error="RESOURCE_EXHAUSTED: out of memory")
        elif part == "vae":
            record.update(status="skipped", reason="0 s of budget left")
        else:
            record.update(status="ok", result=result)
        return self._keep(record).get("result")

    monkeypatch.setattr(suite.Suite, "run", fake_run)
    args = argparse.Namespace(
        out=str(tmp_path), only="", variant="XL/1", dtype="bfloat16", batches=[32, 64, 128],
        steps=5, warmup=2, budget_s=100.0, per_run_s=50.0, min_run_s=5.0,
        upstream_python="python3", upstream_dir="/up", upstream_shared="",
        upstream_device="cuda", tiny=False,
        overwrite=False)
    summary = suite.run_parts(args)
    trains = [argv for part, argv in calls if part == "train"]
    assert [a[a.index("--batch") + 1] for a in trains] == ["32", "64", "64"]
    assert "--remat" in trains[-1]
    assert summary["train"]["batch"] == 32 and summary["remat"]["batch"] == 64
    assert summary["train"]["memory_gb_per_image"] == 2.0
    attention = [argv[argv.index("--attention") + 1] for part, argv in calls
                 if part == "attention"]
    assert attention == ["cudnn"]  # the ladder's run is the default (jax.nn's XLA path)
    assert summary["attention"]["default"] == summary["train"]
    upstream = [argv for part, argv in calls if part == "upstream"]
    assert len(upstream) == 4 and all("--device" in a and "cuda" in a for a in upstream)
    assert upstream[0][upstream[0].index("--batch") + 1] == "32"
    assert sum("--compile" in a for a in upstream) == 2
    (metrics,) = [argv for part, argv in calls if part == "metrics"]
    assert metrics[metrics.index("--num_fake") + 1] == "50000"
    assert summary["runs"]["skipped"] == 2 and summary["runs"]["failed"] == 1
    assert "RESOURCE_EXHAUSTED" in (tmp_path / "summary.md").read_text()

    # a second suite into the same folder keeps the first one's results unless told, and
    # a mistake in the arguments loses nothing even with --overwrite
    with pytest.raises(SystemExit, match="results.jsonl exists"):
        suite.run_parts(args)
    first = (tmp_path / "results.jsonl").read_text()
    with pytest.raises(SystemExit, match="parts are"):
        suite.run_parts(argparse.Namespace(**{**vars(args), "only": "train,bogus",
                                              "overwrite": True}))
    assert (tmp_path / "results.jsonl").read_text() == first
    args.overwrite = True
    assert suite.run_parts(args)["runs"] == summary["runs"]

    # upstream asked for without an interpreter: no ladder for it, one skipped record
    calls.clear()
    args.only, args.upstream_python = "upstream", ""
    summary = suite.run_parts(args)
    assert calls == [] and summary["runs"]["skipped"] == 1
    assert "no --upstream_python" in (tmp_path / "summary.md").read_text()


def test_suite_run_records_ok_failed_timeout_and_skipped(tmp_path):
    from bench import suite

    runner = suite.Suite(tmp_path, budget_s=30.0, per_run_s=2.0, min_run_s=0.2)
    python = lambda code: [sys.executable, "-c", code]  # noqa: E731
    assert runner.run("a", python("print('text'); print('{\"x\": 1}')"), "ok") == {"x": 1}
    oom = "import sys; print('RESOURCE_EXHAUSTED: Out of memory', file=sys.stderr); sys.exit(1)"
    assert runner.run("a", python(oom), "fails") is None
    assert runner.run("a", python("import time; time.sleep(30)"), "hangs") is None
    runner.deadline = 0.0  # the budget is spent
    assert runner.run("a", python("print('{}')"), "too late") is None
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "failed", "timeout", "skipped"]
    assert records[1]["error"] == "RESOURCE_EXHAUSTED: Out of memory"

    # a traceback that JAX ends with its frame-filtering footer: the exception line is kept
    jax_traceback = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
                     "jax.errors.JaxRuntimeError: INTERNAL: cuDNN attention failed",
                     "-" * 20, "For simplicity, JAX has removed its internal frames from the "
                     "traceback of the following exception. Set JAX_TRACEBACK_FILTERING=off "
                     "to include these."]
    assert suite._error_line(jax_traceback) == (
        "jax.errors.JaxRuntimeError: INTERNAL: cuDNN attention failed")
    assert suite._error_line(["some log line", "last words"]) == "last words"


@pytest.mark.parametrize("module,argv,message", [
    ("train_step", ["--batch", "0"], "--batch: '0' is not a positive integer"),
    ("train_step", ["--batch", "-2"], "--batch: '-2' is not a positive integer"),
    ("sample", ["--num_steps", "-1"], "--num_steps: '-1' is not an integer >= 0"),
    ("vae", ["--size", "0"], "--size: '0' is not a positive integer"),
    ("suite", ["--out", "x", "--batches", "32,abc"], "--batches: 'abc' is not an integer"),
    ("suite", ["--out", "x", "--batches", ","], "no batch"),
    ("suite", ["--out", "x", "--steps", "0"], "--steps: '0' is not a positive integer"),
])
def test_bench_commands_refuse_bad_counts(capsys, module, argv, message):
    """Counts are checked when the command line is read: one usage line, exit 2, no run."""
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"bench.{module}").main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bench_runs_refuse_bad_values_readably():
    from bench import sample, train_step, vae

    with pytest.raises(SystemExit, match="VA-VAE --variant 'bogus'.*long_stage3"):
        train_step.vavae_config("bogus", "float32")
    with pytest.raises(SystemExit, match="--batch 0: must be at least 1"):
        train_step.compiled_step("lightningdit", "tiny", batch=0)
    with pytest.raises(SystemExit, match="must be even and at least 2"):
        sample.run("tiny", batch=0)
    with pytest.raises(SystemExit, match="--num_steps 1: at least 2 grid points"):
        sample.run("tiny", batch=2, num_steps=1)
    with pytest.raises(SystemExit, match="--size 30: must be a positive multiple of"):
        vae.run("tiny", size=30)


def _in_git_checkout() -> bool:
    return subprocess.run(["git", "rev-parse", "--git-dir"], cwd=ab.REPO,
                          capture_output=True).returncode == 0


needs_git = pytest.mark.skipif(not _in_git_checkout(), reason="not a git checkout")


@needs_git
def test_ab_runs_each_version_in_its_own_process(capsys):
    """An A/A run (HEAD against this checkout) of the tiny train step: one process per run,
    the ratio from the runs' own JSON."""
    r = ab.main(["--base", "HEAD", "--pairs", "1", "--", "bench.train_step", "--variant",
                 "tiny", "--batch", "4", "--steps", "1", "--warmup", "0"])
    assert last_json(capsys) == json.loads(json.dumps(r))
    assert r["head_commit"] == ab.WORKTREE and len(r["base_commit"]) == 40
    assert len(r["base_values"]) == len(r["head_values"]) == 1 and min(r["base_values"]) > 0
    assert r["ratio_median"] == pytest.approx(r["head_values"][0] / r["base_values"][0])


@needs_git
def test_ab_refuses_what_it_cannot_compare(tmp_path):
    with pytest.raises(SystemExit, match="no-such-revision"):
        ab.main(["--base", "no-such-revision", "--", "bench.train_step"])
    bench = tmp_path / "fake_bench.py"
    for body, message in [('print("x")\nprint(\'{"step_s": 2.0, "name": "a"}\')', None),
                          ('print(\'{"name": "a", "mfu": 0.5}\')', "numeric keys: mfu"),
                          ('print("not json")', "not JSON"),
                          ('raise ValueError("broken")', "ValueError: broken")]:
        bench.write_text(body + "\n")
        if message is None:
            assert ab.run_once(tmp_path, ["fake_bench"], "step_s", 60) == 2.0
        else:
            with pytest.raises(SystemExit, match=message):
                ab.run_once(tmp_path, ["fake_bench"], "step_s", 60)


# -- the benchmarks outside the suite, each run once as its command -------------------------


def run_bench(module: str, *args: str) -> str:
    from helpers import run_module

    return run_module(module, *args, timeout=600)


def test_dit_throughput_measures_each_precision_side_by_side():
    out = run_bench("bench.dit_throughput", "--variant", "tiny", "--batch", "2", "--steps", "1")
    r = json.loads(out[out.index("{"):])
    assert set(r["results"]) == {"float32", "bfloat16", "bfloat16+remat"}
    assert r["results"]["float32"]["speed_vs_float32"] == 1.0
    assert all(v["img_per_s"] > 0 and v["tflops_per_device"] > 0 for v in r["results"].values())


def test_vavae_generator_step_times_both_formulations():
    out = run_bench("bench.vavae_generator_step", "--config", "tiny", "--batch", "2",
                    "--steps", "1")
    r = json.loads(out[out.index("{"):])["results"]
    assert r["staged"]["ms_per_call"] > 0 and r["reference"]["ms_per_call"] > 0
    assert r["speedup_staged_vs_reference"] == pytest.approx(
        r["reference"]["ms_per_call"] / r["staged"]["ms_per_call"])


def test_train_memory_extrapolates_the_xl1_step(tmp_path):
    from configs.lightningdit import get_config

    run_bench("bench.train_memory", "--model", "lightningdit", "--per_device_batch", "2",
              "--dit_depths", "1,2", "--json", str(tmp_path / "memory.json"))
    r = json.loads((tmp_path / "memory.json").read_text())["results"]["lightningdit"]
    assert r["config"] == "configs/lightningdit.py:xl1_64ep"
    model = get_config("xl1_64ep").model
    assert (model.hidden_size, model.depth) == (1152, 28)
    assert r["state"]["params"]["bytes"] / 4 == pytest.approx(675e6, rel=2e-3)  # XL/1, f32
    for v in r["variants"].values():
        assert v["peak"] == v["argument"] + v["temp"] + v["output"] - v["alias"]
        assert v["extrapolated_from_depths"] == [1, 2] and v["temp_per_block"] > 0
        assert v["scheduler"] in train_memory.SCHEDULERS
    # each block's activations are recomputed, not kept (on XLA:CPU's own terms remat kept
    # them all: 0.68 against 0.73 GiB per block at batch 32)
    per_block = {name: v["temp_per_block"] for name, v in r["variants"].items()}
    assert per_block["bfloat16+remat"] < 0.5 * per_block["bfloat16"]


def test_data_pipeline_times_the_real_pipelines(tmp_path):
    run_bench("bench.data_pipeline", "--num_images", "16", "--batch", "4", "--latent_batch",
              "8", "--num_latents", "64", "--seconds", "0.5", "--rounds", "1", "--workers", "0",
              "--data", str(tmp_path / "jpegs"), "--json", str(tmp_path / "pipeline.json"))
    r = json.loads((tmp_path / "pipeline.json").read_text())
    assert sum(r["jpegs"]["sizes"].values()) == 16
    assert set(r["image_pipeline"]) == {"center_crop workers=0", "random_crop workers=0"}
    assert all(v["per_s"] > 0 for v in [*r["image_pipeline"].values(),
                                        *r["latent_pipeline"].values()])
    assert r["forward_gflop"]["autoencoder"]["gflop"] == pytest.approx(362.2, rel=1e-3)
