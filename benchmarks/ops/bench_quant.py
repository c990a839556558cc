"""gguf_linear (weights kept in GGUF blocks) vs F.linear on the dequantized fp32 weight.

    python benchmarks/ops/bench_quant.py [--formats Q4_1,Q8_0] [--m 1,64] [--threads 2]
                                         [--shapes q,kv,gate_up,down,lm_head]
                                         [--pool-mb 128] [--repeats 5] [--output quant.json]

Shapes are SmolLM2-135M's projections (hidden 576, MLP 1536, 9/3 heads of 64, vocab 49152; its
default GGUF file stores them in Q4_1 and the tied embedding / LM head in Q8_0) and, by name
(g_*), Gemma 3 270M's. Cases whose K does not fit a format's block are skipped. Each case
cycles through distinct weights (--pool-mb of quantized weights, and as many fp32 ones for
F.linear, at most 512 MiB; the last-level cache here is 32 MiB) so that every call streams its
weight from DRAM, as in a forward pass. Reported per case: GB/s of weight bytes streamed (quantized bytes for ours, fp32 bytes for
F.linear), that as a fraction of the copy bandwidth measured the same way, GFLOP/s (2 M N K per
call), and the speedup over F.linear (time ratio). Timing keeps each call's best of --repeats
passes (the machine may be shared); the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from bench_linear import copy_gb_s  # same folder: run as a script

from sagellm import ops
from sagellm.ops.quant import GGUF_BLOCKS, gguf_kernel, gguf_linear
from sagellm.ops.reference.quant import dequantize_gguf, random_gguf_blocks

SHAPES = {  # name: (N, K) of the weight
    # SmolLM2-135M (its file: Q4_1, embedding / LM head Q8_0)
    "q": (576, 576),
    "kv": (192, 576),
    "gate_up": (3072, 576),
    "down": (576, 1536),
    "lm_head": (49152, 576),
    # Gemma 3 270M (its Q4_K_M file: Q4_K / Q6_K where K % 256 == 0, else Q5_0 / Q8_0)
    "g_q": (1024, 640),
    "g_gate": (2048, 640),
    "g_o": (640, 1024),
    "g_down": (640, 2048),
}
QTYPES = {name: t for t, (name, _, _) in GGUF_BLOCKS.items()}
MAX_DENSE_POOL_BYTES = 512 * 2**20


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",")]


def per_call_s(fn, x, weights, repeats: int) -> float:
    """Seconds per call: each weight's best time over `repeats` passes over the pool, then the
    median over the weights (the machine is shared: a pass, or several, may be interrupted)."""
    best = [math.inf] * len(weights)
    for w in weights:  # warm-up: page in, thread pool up
        fn(x, w)
    for _ in range(repeats):
        for i, w in enumerate(weights):
            start = time.perf_counter_ns()
            fn(x, w)
            best[i] = min(best[i], time.perf_counter_ns() - start)
    return statistics.median(best) * 1e-9


def read_gb_s(repeats: int, mib: int = 512) -> float:
    """DRAM read bandwidth as the GEMVs see it: x.sum() over `mib` MiB, best of `repeats`."""
    x = torch.ones(mib * 2**20 // 4)
    best = math.inf
    for _ in range(repeats + 1):
        start = time.perf_counter_ns()
        x.sum()
        best = min(best, time.perf_counter_ns() - start)
    return x.numel() * 4 / (best * 1e-9) / 1e9


def pools(qtype: int, n: int, k: int, pool_mb: int) -> tuple[list, list]:
    """Distinct quantized weights (pool_mb MiB, at least 2) and distinct fp32 weights of the same
    shape for F.linear (as many, at most MAX_DENSE_POOL_BYTES; their values do not change its
    speed, so they are random, except the first: the dequantized first quantized weight)."""
    g = torch.Generator().manual_seed(0)
    row_bytes = k // GGUF_BLOCKS[qtype][1] * GGUF_BLOCKS[qtype][2]
    count = max(2, math.ceil(pool_mb * 2**20 / (n * row_bytes)))
    quantized = [random_gguf_blocks(qtype, n, k, g) for _ in range(count)]
    dense_count = max(2, min(count, MAX_DENSE_POOL_BYTES // (n * k * 4)))
    dense = [dequantize_gguf(quantized[0], qtype)]
    dense += [torch.randn(n, k, generator=g) * 0.02 for _ in range(dense_count - 1)]
    return quantized, dense


def run_case(qtype, name, quantized, dense, m, repeats, read) -> dict:
    n, k = dense[0].shape
    x = torch.randn(m, k)
    out = torch.empty(m, n)
    ours = per_call_s(lambda a, w: gguf_linear(a, w, qtype, out=out), x, quantized, repeats)
    torch_s = per_call_s(lambda a, w: F.linear(a, w), x, dense, repeats)
    qbytes = quantized[0].numel()
    flops = 2 * m * n * k
    return {
        "format": GGUF_BLOCKS[qtype][0],
        "shape": name,
        "n": n,
        "k": k,
        "m": m,
        "ours_us": ours * 1e6,
        "f_linear_us": torch_s * 1e6,
        "ours_gb_s": qbytes / ours / 1e9,
        "ours_vs_read_bw": qbytes / ours / 1e9 / read,
        "f_linear_gb_s": n * k * 4 / torch_s / 1e9,
        "ours_gflop_s": flops / ours / 1e9,
        "f_linear_gflop_s": flops / torch_s / 1e9,
        "speedup": torch_s / ours,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="Q4_1,Q8_0,Q4_K,Q6_K,Q5_0,Q4_0,Q5_K,Q5_1")
    parser.add_argument("--m", type=_ints, default=[1, 64], help="comma list of batch rows")
    parser.add_argument("--shapes", default="q,kv,gate_up,down,lm_head", help="SHAPES names")
    parser.add_argument("--threads", type=_ints, default=[torch.get_num_threads()])
    parser.add_argument("--pool-mb", type=int, default=128, help="distinct weights per case, MiB")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes; the best is kept")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    formats, shapes = args.formats.split(","), args.shapes.split(",")
    for f in formats:
        if f not in QTYPES:
            parser.error(f"--formats {f!r}: expected some of {sorted(QTYPES)}")
    for s in shapes:
        if s not in SHAPES:
            parser.error(f"--shapes {s!r}: expected some of {sorted(SHAPES)}")

    load_before = os.getloadavg()
    rows, reads, copies = [], {}, {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        copies[threads] = copy_gb_s(args.repeats)
        reads[threads] = read = read_gb_s(args.repeats)
        for fmt in formats:
            qtype = QTYPES[fmt]
            for name in shapes:
                n, k = SHAPES[name]
                if k % GGUF_BLOCKS[qtype][1]:
                    continue  # K-quants need K % 256 == 0
                quantized, dense = pools(qtype, n, k, args.pool_mb)
                for m in args.m:
                    row = run_case(qtype, name, quantized, dense, m, args.repeats, read)
                    rows.append({"threads": threads, "kernel": gguf_kernel(qtype), **row})
                del quantized, dense
    load_after = os.getloadavg()

    print(f"cpu isa {ops.cpu_isa()}, load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    for threads in copies:
        print(
            f"{threads} thread(s): read bandwidth (x.sum()) {reads[threads]:.1f} GB/s, "
            f"copy bandwidth {copies[threads]:.1f} GB/s"
        )
    header = (
        f"{'thr':>3} {'fmt':>4} {'shape':>8} {'N x K':>11} {'M':>3} {'ours us':>8} "
        f"{'GB/s':>6} {'/read':>5} {'GFLOP/s':>7} | {'F.lin us':>8} {'GB/s':>6} {'GFLOP/s':>7} "
        f"| {'speedup':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['threads']:>3} {r['format']:>4} {r['shape']:>8} {r['n']:>5}x{r['k']:<5} "
            f"{r['m']:>3} {r['ours_us']:>8.1f} {r['ours_gb_s']:>6.1f} {r['ours_vs_read_bw']:>5.2f} "
            f"{r['ours_gflop_s']:>7.1f} | {r['f_linear_us']:>8.1f} {r['f_linear_gb_s']:>6.1f} "
            f"{r['f_linear_gflop_s']:>7.1f} | {r['speedup']:>7.2f}"
        )
    if args.output:
        report = {
            "cpu_isa": ops.cpu_isa(),
            "torch": torch.__version__,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "read_gb_s": reads,
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
