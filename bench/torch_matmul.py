"""Torch's CPU matmul rate, for `bench.compare` to set beside XLA's: upstream runs on torch's
matmul library, ours on XLA's, and on a given CPU the two libraries need not reach the same
fraction of the hardware. Needs only torch (bench.compare runs it with the reference
environment's python):

    /tmp/refenv/bin/python bench/torch_matmul.py --n 2048 --threads 2

Prints one JSON object as its last line: the best TFLOP/s of an (n, n) @ (n, n) matmul over
`--repeats` runs for each of `--dtypes` (bfloat16: bfloat16 result, as autocast's matmuls give).
"""

from __future__ import annotations

import argparse
import json
import time


def best_tflops(torch, n: int, dtype, repeats: int) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.matmul(a, b)  # warm-up: thread pool, packing buffers
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with torch.no_grad():
        result = {name: best_tflops(torch, args.n, getattr(torch, name), args.repeats)
                  for name in args.dtypes.split(",")}
    print(json.dumps({"bench": "torch_matmul", "n": args.n, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "tflops": result}))


if __name__ == "__main__":
    main()
