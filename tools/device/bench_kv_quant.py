"""Decode attention over bf16, int8 and fp8 (e4m3) KV caches on one GPU: time and effective
bandwidth, counting the bytes each call must read (K and V rows of the visible keys, their
scales for a quantized cache, the block table, queries and outputs).

    python tools/device/bench_kv_quant.py [--json PATH] [--reps N]

Shapes: 32 query heads / 8 KV heads, head_size 128, bf16 queries, block size 16; batch 64 at
context 2048 and batch 16 at context 8192 (both ~268 MB of bf16 K+V, far beyond L2). Each
figure is the median over --reps timed batches of 10 back-to-back calls (CUDA events, after a
warm-up). The JSON goes to PATH, else to $OUT/bench_kv_quant.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics

import torch

import sagellm  # noqa: F401  (registers torch.ops.sagellm)

HEADS, KV_HEADS, HEAD_SIZE, BLOCK = 32, 8, 128, 16
CASES = [(64, 2048), (16, 8192)]
CACHES = {"bf16": torch.bfloat16, "int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
INNER = 10


def make_inputs(batch: int, ctx: int, cache_dtype: torch.dtype):
    blocks_per_seq = ctx // BLOCK
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_SIZE)
    if cache_dtype == torch.bfloat16:
        kc = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        scales = (None, None)
    else:
        # Any bytes but e4m3's NaN encodings (0x7f, 0xff): the kernel's speed does not depend on
        # the values, and reshape_and_cache never writes NaN.
        raw = torch.randint(0, 256, (2, *shape), device="cuda", dtype=torch.uint8)
        if cache_dtype == torch.float8_e4m3fn:
            raw[(raw & 0x7F) == 0x7F] = 0
        kc, vc = raw.view(cache_dtype).unbind(0)
        ks = torch.rand(shape[:3], device="cuda") / 64
        vs = torch.rand(shape[:3], device="cuda") / 64
        scales = (ks, vs)
    table = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, -1)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    query = torch.randn(batch, HEADS, HEAD_SIZE, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(query)
    return out, query, kc, vc, table, lens, scales


def bytes_read(batch: int, ctx: int, cache_dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=cache_dtype).element_size()
    kv = 2 * batch * ctx * KV_HEADS * HEAD_SIZE * elem
    scales = 0 if cache_dtype == torch.bfloat16 else 2 * batch * ctx * KV_HEADS * 4
    table = batch * (ctx // BLOCK) * 4
    q_out = 2 * batch * HEADS * HEAD_SIZE * 2
    return kv + scales + table + q_out


def time_call(fn, reps: int) -> float:
    """Median seconds per call."""
    for _ in range(3 * INNER):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(INNER):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / INNER)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="where to write the results")
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    print(f"device: {torch.cuda.get_device_name()}")
    header = (
        f"{'batch x ctx':>12} {'cache':>9} {'time us':>9} {'MB read':>9} {'TB/s':>6} {'vs bf16':>8}"
    )
    print(header)
    for batch, ctx in CASES:
        base = None
        for name, dtype in CACHES.items():
            out, query, kc, vc, table, lens, (ks, vs) = make_inputs(batch, ctx, dtype)
            call = functools.partial(
                torch.ops.sagellm.paged_attention_decode,
                *(out, query, kc, vc, table, lens, HEAD_SIZE**-0.5, -1, 0.0, ks, vs),
            )
            sec = time_call(call, args.reps)
            nbytes = bytes_read(batch, ctx, dtype)
            base = sec if base is None else base
            row = {
                "batch": batch,
                "context": ctx,
                "cache": name,
                "time_us": sec * 1e6,
                "bytes_read": nbytes,
                "tb_per_s": nbytes / sec / 1e12,
                "speedup_vs_bf16": base / sec,
            }
            results.append(row)
            print(
                f"{f'{batch} x {ctx}':>12} {name:>9} {row['time_us']:9.1f} {nbytes / 1e6:9.1f} "
                f"{row['tb_per_s']:6.2f} {row['speedup_vs_bf16']:7.2f}x"
            )
            del call, out, query, kc, vc, table, lens, ks, vs
            torch.cuda.empty_cache()
    path = args.json
    if path is None and os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "bench_kv_quant.json")
    if path:
        info = {"device": torch.cuda.get_device_name(), "heads": HEADS, "kv_heads": KV_HEADS}
        info |= {"head_size": HEAD_SIZE, "block_size": BLOCK, "results": results}
        with open(path, "w") as f:
            json.dump(info, f, indent=2)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
