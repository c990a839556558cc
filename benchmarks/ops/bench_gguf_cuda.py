"""gguf_linear on CUDA vs F.linear with a bf16 weight, on Llama-3-8B's projection shapes.

    python benchmarks/ops/bench_gguf_cuda.py [--types Q4_0,Q4_K,Q6_K,Q8_0] [--m 1,16,64]
                                             [--pool-mb 512] [--replays 20] [--output gguf.json]

Each case cycles through distinct weights (--pool-mb in all, at least 2) so that every call reads
its weight from HBM, not from the 50+ MB L2, as in a real forward pass. The calls over the pool
are captured in one CUDA graph (no launch overhead in the figures) and replayed --replays times
between CUDA events; reported per call: microseconds, the speed-up over F.linear bf16 (weight
(N, K), same input, same run) and the effective TB/s of the quantized weight bytes (row_bytes x N
per call; the dense baseline's TB/s is of its bf16 bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

from sagellm.ops import quant

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K): qkv/o-like, gate/up, down
TYPES = {name: t for t, (name, _, _) in quant.GGUF_BLOCKS.items()}
# Byte offsets of each type's fp16 scale fields inside a block (as in the reference module).
FP16_FIELDS = {2: (0,), 3: (0, 2), 6: (0,), 7: (0, 2), 8: (0,), 12: (0, 2), 13: (0, 2), 14: (208,)}


def random_blocks(qtype: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 [n, row_bytes] on the GPU: random quants, finite fp16 scales of magnitude 2^-10..2^-4."""
    _, elems, nbytes = quant.GGUF_BLOCKS[qtype]
    blocks = k // elems
    w = torch.randint(0, 256, (n, blocks, nbytes), dtype=torch.uint8, device="cuda", generator=gen)
    for off in FP16_FIELDS[qtype]:
        u = torch.rand(n, blocks, device="cuda", generator=gen)
        mag = torch.exp2(-10 + 6 * u)
        sign = torch.where(torch.rand(n, blocks, device="cuda", generator=gen) < 0.5, -1.0, 1.0)
        w[:, :, off : off + 2] = (mag * sign).half().view(torch.uint8).view(n, blocks, 2)
    return w.view(n, blocks * nbytes)


def time_graph(calls, replays: int) -> float:
    """Microseconds per call of `calls` (a list of thunks), captured once and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:  # warm-up outside the capture
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * len(calls))


def pool_count(weight_bytes: int, pool_mb: int) -> int:
    return max(2, math.ceil(pool_mb * 2**20 / weight_bytes))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--types", default="Q4_0,Q4_K,Q6_K,Q8_0")
    p.add_argument("--m", default="1,16,64")
    p.add_argument("--pool-mb", type=int, default=512)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--output", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    names = args.types.split(",")
    ms = [int(v) for v in args.m.split(",")]
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    header = f"{'type':>5} {'N x K':>12} {'M':>4} {'gguf us':>9} {'bf16 us':>9} {'speedup':>8} "
    header += f"{'gguf TB/s':>10} {'bf16 TB/s':>10}"
    print(f"device: {torch.cuda.get_device_name()}")
    print(header)
    for n, k in SHAPES:
        dense_pool = [
            torch.randn(n, k, device="cuda", generator=gen).bfloat16()
            for _ in range(pool_count(n * k * 2, args.pool_mb))
        ]
        for m in ms:
            x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
            t_dense = time_graph(
                [lambda w=w, x=x: F.linear(x, w) for w in dense_pool], args.replays
            )
            for name in names:
                qtype = TYPES[name]
                w0 = random_blocks(qtype, n, k, gen)
                pool = [w0] + [
                    random_blocks(qtype, n, k, gen)
                    for _ in range(pool_count(w0.numel(), args.pool_mb) - 1)
                ]
                outs = [torch.empty(m, n, device="cuda").bfloat16() for _ in pool]
                t = time_graph(
                    [
                        lambda w=w, o=o, x=x, t=qtype: torch.ops.sagellm.gguf_linear(
                            o, x, w, t, None
                        )
                        for w, o in zip(pool, outs, strict=True)
                    ],
                    args.replays,
                )
                row = {
                    "type": name, "n": n, "k": k, "m": m,
                    "gguf_us": t, "bf16_us": t_dense, "speedup": t_dense / t,
                    "gguf_tb_s": w0.numel() / (t * 1e-6) / 1e12,
                    "bf16_tb_s": n * k * 2 / (t_dense * 1e-6) / 1e12,
                }  # fmt: skip
                rows.append(row)
                print(
                    f"{name:>5} {f'{n}x{k}':>12} {m:>4} {t:9.1f} {t_dense:9.1f} "
                    f"{row['speedup']:7.2f}x {row['gguf_tb_s']:10.2f} {row['bf16_tb_s']:10.2f}"
                )
                del pool, outs
        del dense_pool
        torch.cuda.empty_cache()
    if args.output:
        info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
        with open(args.output, "w") as f:
            json.dump(info, f, indent=1)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
