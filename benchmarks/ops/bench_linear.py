"""dense_linear vs torch.nn.functional.linear at decode batch sizes, with cold weights.

    python benchmarks/ops/bench_linear.py [--dtype fp32,bf16] [--m 1,4,16] [--threads 2]
                                          [--pool-mb 400] [--repeats 5] [--output linear.json]

Shapes are SmolLM2-135M's projections (hidden 576, MLP 1536, 9/3 heads of 64, vocab 49152).
At decode the weights do not fit in the last-level cache (the whole model is ~540 MB in fp32), so
each case cycles through enough distinct weight tensors (--pool-mb in all) that every call
streams its weight from DRAM, as in a real forward pass. Reported: GB/s of weight streamed
(each call's best of --repeats passes over the pool, summed: the machine may be shared), the
ratio to F.linear, and the ratio to the copy bandwidth measured the same way at start.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from sagellm import ops
from sagellm.ops.linear import dense_linear

SHAPES = {  # name: (N, K) of the weight
    "qkv": (960, 576),
    "o": (576, 576),
    "gate_up": (3072, 576),
    "down": (576, 1536),
    "lm_head": (49152, 576),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",")]


def best_of_calls_gb_s(fn, inputs, weights, repeats: int) -> float:
    """GB/s of streaming the pool once, taking each call's best time over `repeats` passes.

    The machine is shared: a pass is often interrupted by another process, so the best time of
    each call (each weight) is kept separately and summed, rather than the best whole pass.
    """
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    best = [math.inf] * len(weights)
    for w in weights:  # warm-up: page in, thread pool up
        fn(inputs, w)
    for _ in range(repeats):
        for i, w in enumerate(weights):
            start = time.perf_counter_ns()
            fn(inputs, w)
            best[i] = min(best[i], time.perf_counter_ns() - start)
    return nbytes / (sum(best) * 1e-9) / 1e9


def copy_gb_s(repeats: int, mib: int = 256, chunk_mib: int = 4) -> float:
    """Copy bandwidth measured the same way: dst.copy_(src) of `mib` MiB in `chunk_mib` pieces,
    each piece's best time over `repeats` passes; a copy moves 2 bytes per byte copied."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    pieces = list(zip(src.split(chunk_mib * 2**18), dst.split(chunk_mib * 2**18), strict=True))
    best = [math.inf] * len(pieces)
    for r in range(repeats + 1):
        for i, (s, d) in enumerate(pieces):
            start = time.perf_counter_ns()
            d.copy_(s)
            if r > 0:  # the first pass only pages the buffers in
                best[i] = min(best[i], time.perf_counter_ns() - start)
    return 2 * src.numel() * 4 / (sum(best) * 1e-9) / 1e9


def weight_pool(n: int, k: int, dtype: torch.dtype, pool_mb: int) -> list[torch.Tensor]:
    """Distinct [n, k] weights, pool_mb MiB in all (at least 2), so none is in cache when used."""
    weight_bytes = n * k * torch.tensor([], dtype=dtype).element_size()
    count = max(2, math.ceil(pool_mb * 2**20 / weight_bytes))
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, k, generator=g) / math.sqrt(k)).to(dtype) for _ in range(count)]


def run_case(name, weights, m, repeats: int, copy: float) -> dict:
    n, k = weights[0].shape
    x = torch.randn(m, k).to(weights[0].dtype)
    ours = best_of_calls_gb_s(lambda a, w: dense_linear(a, w), x, weights, repeats)
    torch_gb_s = best_of_calls_gb_s(lambda a, w: F.linear(a, w), x, weights, repeats)
    return {
        "shape": name,
        "n": n,
        "k": k,
        "m": m,
        "weights_in_pool": len(weights),
        "dense_linear_gb_s": ours,
        "f_linear_gb_s": torch_gb_s,
        "vs_f_linear": ours / torch_gb_s,
        "dense_linear_vs_copy": ours / copy,
        "f_linear_vs_copy": torch_gb_s / copy,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    parser.add_argument("--m", type=_ints, default=[1, 4, 16], help="comma list of batch rows")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma list of SHAPES names")
    parser.add_argument("--threads", type=_ints, default=[torch.get_num_threads()])
    parser.add_argument("--pool-mb", type=int, default=400, help="distinct weights per case, MiB")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes; the best is kept")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    dtypes = args.dtype.split(",")
    shapes = args.shapes.split(",")
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"--dtype {d!r}: expected one of {sorted(DTYPES)}")
    for s in shapes:
        if s not in SHAPES:
            parser.error(f"--shapes {s!r}: expected one of {sorted(SHAPES)}")

    load_before = os.getloadavg()
    rows = []
    copies = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        copy = copy_gb_s(args.repeats)
        copies[threads] = copy
        for dtype_name in dtypes:
            for name in shapes:
                weights = weight_pool(*SHAPES[name], DTYPES[dtype_name], args.pool_mb)
                for m in args.m:
                    row = run_case(name, weights, m, args.repeats, copy)
                    rows.append({"threads": threads, "dtype": dtype_name, **row})
                del weights
    load_after = os.getloadavg()

    print(f"cpu isa {ops.cpu_isa()}, load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    for threads, c in copies.items():
        print(f"copy bandwidth with {threads} thread(s): {c:.1f} GB/s")
    header = (
        f"{'thr':>3} {'dtype':>5} {'shape':>8} {'N x K':>11} {'M':>3} "
        f"{'ours GB/s':>9} {'F.lin GB/s':>10} {'ours/F.lin':>10} {'ours/copy':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['threads']:>3} {r['dtype']:>5} {r['shape']:>8} {r['n']:>5}x{r['k']:<5} "
            f"{r['m']:>3} {r['dense_linear_gb_s']:>9.1f} {r['f_linear_gb_s']:>10.1f} "
            f"{r['vs_f_linear']:>10.2f} {r['dense_linear_vs_copy']:>9.2f}"
        )
    if args.output:
        report = {
            "cpu_isa": ops.cpu_isa(),
            "torch": torch.__version__,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "copy_gb_s": copies,
            "pool_mb": args.pool_mb,
            "repeats": args.repeats,
            "results": rows,
        }
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
