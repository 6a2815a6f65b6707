"""Upstream's LightningDiT step, guided call or whole guided sample on CPU (or a CUDA GPU), in
float32 or under torch's bf16 autocast (what Accelerate's bf16 mode does), optionally with
train.py's EMA update.

Run with the reference environment's python, not ours (`bench.compare --dtype bfloat16` does):

    /tmp/refenv/bin/python bench/upstream_torch.py --what train_b1 --dtype bfloat16 \
        [--compile] [--shared ../shared/upstream] [--upstream_dir /tmp/upstream]
    /tmp/refenv/bin/python bench/upstream_torch.py --what train --variant XL/1 --batch 2 \
        --ema --steps 2                      # memory: peak_rss_gib, as bench.train_step
    /tmp/refenv/bin/python bench/upstream_torch.py --what sample_run_b1 --dtype float32 \
        --num_steps 50 --repeats 1           # inference.py's Euler sampling of 4 images
    python3 bench/upstream_torch.py --device cuda --what train --variant XL/1 --batch 64 \
        --ema --compile                      # a GPU: peak_memory_gb from torch.cuda

The same upstream objects as ``../shared/upstream/bench_cpu.py`` (LightningDiT with the
released flags on 16x16x32 latents; the transport's training loss + backward + AdamW; one
guided ``forward_with_cfg`` call; `sample_run*` one whole sample as inference.py draws it:
``Sampler.sample_ode`` Euler over `--num_steps` grid points with shift 0.3 (torchdiffeq), model
``forward_with_cfg`` with cfg 6.7 and the interval from 0.125, `--batch` rows = batch/2 images,
`--warmup` counting guided calls, not samples), 2 threads; bf16 puts ``torch.autocast('cpu',
torch.bfloat16)`` around the forward (master weights float32), and `--ema` adds train.py's
``update_ema`` (decay 0.9999) on a float32 copy of the model, which our step always does.
Prints one JSON object as its last line, with the process's peak RSS in GiB (and on a GPU the
CUDA allocator's peak, `peak_memory_gb`, 10^9 bytes as bench.train_step); GPU calls are timed
to their end (synchronised).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time


def timed(fn, warmup_fn, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        warmup_fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "repeats": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("train", "train_b1", "sample", "sample_b1",
                                           "sample_run", "sample_run_b1"),
                        required=True, help="*_b1 = B/1 (bench.compare's names)")
    parser.add_argument("--variant", default="B/1", help="B/1, XL/1, ... (LightningDiT-*)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--ema", action="store_true", help="train: also update an EMA copy")
    parser.add_argument("--compile", action="store_true",
                        help="keep upstream's @torch.compile decorators active")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--num_steps", type=int, default=50,
                        help="sample_run: grid points of the Euler sample (upstream's 250)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shared", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "upstream"))
    parser.add_argument("--upstream_dir", default=os.environ.get("UPSTREAM_DIR", "/tmp/upstream"))
    args = parser.parse_args()

    os.environ["UPSTREAM_DIR"] = args.upstream_dir
    sys.path.insert(0, os.path.abspath(args.shared))
    import _common  # the shared tools' import shim for upstream (torchvision, sys.path)
    import torch

    _common.UPSTREAM_DIR = args.upstream_dir
    _common.setup(eager=not args.compile, threads=2)
    torch.set_num_threads(2)
    from models.lightningdit import LightningDiT_models
    from transport import create_transport

    device = torch.device(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch sees no CUDA GPU")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    flags = dict(use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True,
                 wo_shift=False, in_channels=32, num_classes=1000, input_size=16)
    variant = "B/1" if args.what.endswith("_b1") else args.variant
    model = LightningDiT_models[f"LightningDiT-{variant}"](**flags).to(device)
    autocast = lambda: torch.autocast(args.device, dtype=torch.bfloat16,  # noqa: E731
                                      enabled=args.dtype == "bfloat16")
    b = args.batch

    if args.what.startswith("train"):
        model.train()
        transport = create_transport("Linear", "velocity", None, None, None,
                                     use_cosine_loss=True, use_lognorm=True)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0,
                                betas=(0.9, 0.95))
        x = torch.randn(b, 32, 16, 16, device=device)
        y = torch.randint(0, 1000, (b,), device=device)
        ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None

        def call():
            with autocast():
                terms = transport.training_losses(model, x, dict(y=y))
                loss = terms["cos_loss"].mean() + terms["loss"].mean()
            opt.zero_grad()
            loss.float().backward()
            opt.step()
            if ema is not None:  # train.py's update_ema
                with torch.no_grad():
                    for e, p in zip(ema.parameters(), model.parameters()):
                        e.mul_(0.9999).add_(p.data, alpha=1 - 0.9999)

        warmup_call = call
    else:
        model.eval()
        n = b // 2
        z = torch.randn(n, 32, 16, 16, device=device)
        x = torch.cat([z, z])
        y = torch.cat([torch.randint(0, 1000, (n,), device=device),
                       torch.full((n,), 1000, device=device)])
        t = torch.full((b,), 0.5, device=device)
        guidance = dict(cfg_scale=6.7, cfg_interval=True, cfg_interval_start=0.125)

        def guided_call():
            with torch.no_grad(), autocast():
                model.forward_with_cfg(x, t, y, **guidance)

        call = warmup_call = guided_call
        if args.what.startswith("sample_run"):  # inference.py's sampling loop
            from transport import Sampler

            sample_fn = Sampler(create_transport("Linear", "velocity", None, None, None)
                                ).sample_ode(sampling_method="euler", num_steps=args.num_steps,
                                             atol=1e-6, rtol=1e-3, reverse=False,
                                             timestep_shift=0.3)

            def sample_call():
                with torch.no_grad(), autocast():
                    sample_fn(x, model.forward_with_cfg, y=y, **guidance)[-1]

            call = sample_call  # warmed up (compiled) on single guided calls, not samples

    synced = lambda fn: lambda: (fn(), sync())  # noqa: E731
    result = timed(synced(call), synced(warmup_call), args.warmup, args.repeats)
    if args.what.startswith("sample_run"):
        result.update(num_steps=args.num_steps, images=b // 2)
    result.update(what=args.what, variant=variant, batch=b, ema=args.ema,
                  dtype="bfloat16 autocast" if args.dtype == "bfloat16" else "float32",
                  compile=args.compile, torch=torch.__version__,
                  threads=torch.get_num_threads(),
                  device=(torch.cuda.get_device_name() if args.device == "cuda" else "cpu"),
                  peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    if args.device == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(json.dumps(result))


if __name__ == "__main__":
    main()
