"""The whole paper on a laptop: data -> VA-VAE -> latents -> LightningDiT -> samples -> scores.

    python -m launch.demo --workdir runs/demo          # about 10 minutes on 2 CPU cores

CPU only, nothing downloaded. Each stage calls the library of the real entry point
(`launch.train`, `launch.extract_latents`, `launch.sample`, `launch.evaluate`,
`launch.evaluate_tokenizer`, `launch.convert`):

  1. procedural class-conditional shapes (10 classes, 32x32): a training set and a held-out set;
  2. a tiny VA-VAE trained with L1 + KL + PatchGAN + the VF loss against a small frozen ViT of
     DINOv2's architecture with RANDOM weights (`--dinov2=PATH` uses a real DINOv2 checkpoint;
     LPIPS is off: its VGG weights would be random too);
  3. latents of the training set and their channel statistics;
  4. a tiny LightningDiT on those latents (rectified flow, logit-normal t);
  5. class-conditional samples with classifier-free guidance, decoded by the VA-VAE;
  6. reconstruction PSNR / SSIM on held-out images, and for the samples the share a separately
     trained classifier assigns to the requested class and the Frechet distance of its
     features (the demo's "Inception");
  7. the checkpoints exported as upstream PyTorch files.

Writes `samples.png`, `reconstructions.png`, TensorBoard logs under `vavae/` and `dit/`, and
`summary.json` (`recon_psnr`, `sample_accuracy`, `fd`, ... and the seconds of each stage).
Rerunning the command resumes an interrupted stage and reuses finished ones.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import flags, logging

from launch import cli

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Output directory.")
_QUICK = flags.DEFINE_bool("quick", False, "A few steps per stage (the CI smoke test).")
_DINOV2 = flags.DEFINE_string("dinov2", "", "DINOv2 ViT-L/14 weights for the VF loss "
                              "(default: a small random ViT of DINOv2's architecture).")

SUMMARY_FILE = "summary.json"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv):
    del argv
    from launch.demo import stages

    demo = stages.Demo(_WORKDIR.value, stages.QUICK if _QUICK.value else stages.FULL,
                       dinov2=_DINOV2.value)
    if demo.dinov2 and not os.path.exists(demo.dinov2):
        raise cli.UserError(f"--dinov2 {demo.dinov2!r} does not exist")
    os.makedirs(demo.workdir, exist_ok=True)
    summary_path = demo.path(SUMMARY_FILE)
    summary = {"seconds": {}}
    start = time.perf_counter()
    for k, (name, title, run) in enumerate(stages.STAGES, 1):
        elapsed = time.perf_counter() - start
        _say(f"\n==> [{k}/{len(stages.STAGES)}] {title}  ({elapsed / 60:.1f} min so far)")
        t0 = time.perf_counter()
        result = run(demo)
        seconds = round(time.perf_counter() - t0, 1)
        summary["seconds"][name] = seconds
        summary.update({key: value for key, value in result.items()})
        _say(f"    done in {seconds:.0f} s" + "".join(
            f" | {key} {value:.4g}" for key, value in result.items()
            if isinstance(value, float)))
    summary["seconds"]["total"] = round(time.perf_counter() - start, 1)
    summary["quick"] = _QUICK.value
    summary["foundation"] = demo.dinov2 or "random tiny ViT (DINOv2 architecture)"
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    logging.info("wrote %s", summary_path)
    _say(f"\nsamples: {demo.path('samples.png')}\nreconstructions: "
         f"{demo.path('reconstructions.png')}\nsummary: {summary_path}")
    print(json.dumps({k: summary[k] for k in ("recon_psnr", "sample_accuracy", "fd")
                      if k in summary} | {"seconds": summary["seconds"]["total"]}))


if __name__ == "__main__":
    cli.run(main)
