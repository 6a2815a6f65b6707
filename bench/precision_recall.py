"""Precision / recall speed (`eval_jax.metrics.precision_recall`) on random pool3-like features.

    python -m bench.precision_recall --num_real 10000 --num_fake 10000
    python -m bench.precision_recall --num_real 10000 --num_fake 50000 --distances float32

ADM's evaluation compares 10,000 reference images with 50,000 samples in Inception's 2048-d
pool3 space: three passes of squared distances (each side's k-NN radii, then the memberships),
2 D (Nr^2 + Nf^2 + Nr Nf) FLOPs in their matmuls. `seconds` is the median of `--steps` whole
`precision_recall` calls after `--warmup` (which compiles). The last line printed is one JSON
object.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench import common


def features(n: int, dim: int, seed: int) -> np.ndarray:
    """Non-negative features of pool3's kind (averages of ReLU outputs), float32 (n, dim)."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(0.3, 0.4, (n, dim)), 0.0).astype(np.float32)


def run(num_real: int = 10000, num_fake: int = 10000, dim: int = 2048,
        distances: str = "float16", steps: int = 3, warmup: int = 1) -> dict:
    from eval_jax import metrics

    real, fake = features(num_real, dim, 0), features(num_fake, dim, 1)
    result = {}

    def call():
        result["pr"] = metrics.precision_recall(real, fake, distances=distances)
        return np.zeros(())

    t = common.time_calls(call, steps=steps, warmup=warmup)
    flops = 2 * dim * (num_real**2 + num_fake**2 + num_real * num_fake)
    return {
        "num_real": num_real, "num_fake": num_fake, "dim": dim, "distances": distances,
        "seconds": t["median_s"], "min_s": t["min_s"], "max_s": t["max_s"],
        "distance_flops": flops, "tflops_per_s": flops / t["median_s"] / 1e12,
        "precision": result["pr"][0], "recall": result["pr"][1], **common.device_info(),
    }


def report(r: dict) -> None:
    print(f"precision / recall, {r['num_real']} real x {r['num_fake']} fake, {r['dim']}-d, "
          f"{r['distances']} distances on {r['device']}: {common.fmt_s(r['seconds'])} "
          f"({r['tflops_per_s']:.3f} TFLOP/s in the distance matmuls)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_real", type=common.positive_int, default=10000)
    parser.add_argument("--num_fake", type=common.positive_int, default=10000)
    parser.add_argument("--dim", type=common.positive_int, default=2048)
    parser.add_argument("--distances", default="float16", choices=("float16", "float32"),
                        help="ADM's float16 distances or float32 ones")
    common.common_args(parser, steps=3, warmup=1, dtype=False)
    args = parser.parse_args(argv)
    common.start(args)
    r = run(args.num_real, args.num_fake, args.dim, args.distances, args.steps, args.warmup)
    report(r)
    common.emit(r)


if __name__ == "__main__":
    main()
