"""Torch's CPU matmul rate, for `bench.compare` to set beside XLA's: upstream runs on torch's
matmul library, ours on XLA's, and on a given CPU the two libraries need not reach the same
fraction of the hardware. Needs only torch (bench.compare runs it with the reference
environment's python):

    /tmp/refenv/bin/python bench/torch_matmul.py --n 2048 --threads 2

Prints one JSON object as its last line: the best TFLOP/s of an (n, n) @ (n, n) matmul over
`--repeats` runs for each of `--dtypes` (bfloat16: bfloat16 result, as autocast's matmuls give),
and the size used for each. Where a dtype has no fast kernel (bfloat16 on a CPU without bf16
instructions: minutes per 2048^3 matmul) a smaller size is used, the largest whose runs fit
`--max_seconds` by a 256^3 probe.
"""

from __future__ import annotations

import argparse
import json
import time

PROBE_N, MIN_N = 256, 128


def timed_matmul(torch, n: int, dtype) -> tuple:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    start = time.perf_counter()
    torch.matmul(a, b)
    return a, b, time.perf_counter() - start


def affordable_n(torch, n: int, dtype, repeats: int, max_seconds: float) -> int:
    """The largest size <= n (halving, not below MIN_N) whose warm-up + `repeats` runs are
    estimated, from a 256^3 probe scaled by n^3, to fit `max_seconds`."""
    timed_matmul(torch, PROBE_N, dtype)  # thread pool, packing buffers
    probe = timed_matmul(torch, PROBE_N, dtype)[2]
    while n > MIN_N and probe * (n / PROBE_N) ** 3 * (repeats + 1) > max_seconds:
        n //= 2
    return max(n, MIN_N)


def best_tflops(torch, n: int, dtype, repeats: int) -> float:
    a, b, _ = timed_matmul(torch, n, dtype)  # warm-up at this size
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
    parser.add_argument("--max_seconds", type=float, default=60.0,
                        help="per dtype: use a smaller size where --n would take longer")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    tflops, sizes = {}, {}
    with torch.no_grad():
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            sizes[name] = affordable_n(torch, args.n, dtype, args.repeats, args.max_seconds)
            tflops[name] = best_tflops(torch, sizes[name], dtype, args.repeats)
    print(json.dumps({"bench": "torch_matmul", "n": args.n, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "tflops": tflops, "sizes": sizes}))


if __name__ == "__main__":
    main()
