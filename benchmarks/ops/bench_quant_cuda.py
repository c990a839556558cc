"""Quantized GEMMs on CUDA against F.linear bf16, with cold weights (Llama-3-8B projections).

    python benchmarks/ops/bench_quant_cuda.py [--m 1,16,64,256] [--shapes gate_up,down,qkv,o]
        [--dtype bf16] [--reps 50] [--pool-mb 256] [--output quant_cuda.json]

Methods per (shape, M): F.linear with a bf16 weight [N, K] (the baseline), int8_linear (per-row
scales), int4_linear (group 128, symmetric and with zero points), fp8_linear (per-token e4m3
activations x per-channel e4m3 weight through torch._scaled_mm) and the plain alternative to
the fused kernels, dequantize + cuBLAS written in torch (int8: w = q.to(bf16) * s, then
F.linear).

Timing: each method runs over a pool of distinct weights (--pool-mb per method, >= 4x the 60 MB
L2 of an H100/H200, so every call streams its weight from HBM), captured once as a CUDA graph
(no launch gaps: a decode step replays graphs too); one rep = one replay timed with CUDA
events, divided by the pool size; reported: median of --reps reps after 5 warm-ups. TB/s counts
the bytes of the weight as the method stores it (int4: packed values + fp32 scales + zeros).
The device copy bandwidth (2 x bytes / time of a 1 GiB copy) is measured first for scale.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

from sagellm.ops import quant

SHAPES = {  # name: (N, K) of the weight, Llama-3-8B
    "gate_up": (14336, 4096),
    "down": (4096, 14336),
    "qkv": (6144, 4096),
    "o": (4096, 4096),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",")]


def copy_tb_s(reps: int = 20) -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return 2 * src.numel() / statistics.median(times[2:]) / 1e12


def time_pool(fn, weights: list, reps: int) -> float:
    """Median seconds per call of fn(w) over the pool, captured as one CUDA graph."""
    for w in weights:  # warm-up outside the capture (lazy init, cuBLAS workspaces)
        fn(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(w)
    for _ in range(5):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / len(weights))
    del graph
    return statistics.median(times)


def nbytes(w) -> int:
    return sum(t.numel() * t.element_size() for t in w if isinstance(t, torch.Tensor))


def pool_of(make, weight_bytes: int, pool_mb: int) -> list:
    return [make(i) for i in range(max(2, math.ceil(pool_mb * 2**20 / weight_bytes)))]


def methods(n: int, k: int, dtype: torch.dtype, pool_mb: int):
    """name -> (pool of weights, fn(x, w)); weights are random (the kernels are data-blind)."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def dense(_):
        return (torch.randn(n, k, device=dev, dtype=dtype, generator=g) / math.sqrt(k),)

    def int8(_):
        q = torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8, generator=g)
        return q, torch.rand(n, device=dev, generator=g) / (64 * math.sqrt(k))

    def int4(zeros: bool):
        def make(_):
            w = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8, generator=g)
            s = torch.rand(n, k // 128, device=dev, generator=g) / (8 * math.sqrt(k))
            z = torch.randint(0, 16, s.shape, device=dev, dtype=torch.uint8, generator=g)
            return w, s, (z if zeros else None)

        return make

    def fp8(_):
        w = torch.randn(n, k, device=dev, generator=g) / math.sqrt(k)
        return quant.quantize_fp8_weight(w)

    def deq8(x, w):
        return F.linear(x, w[0].to(dtype) * w[1].to(dtype)[:, None])

    table = {
        "F.linear": (dense, lambda x, w: F.linear(x, w[0]), n * k * 2),
        "int8": (int8, lambda x, w: quant.int8_linear(x, w[0], w[1]), n * k + 4 * n),
        "int4": (int4(False), lambda x, w: quant.int4_linear(x, w[0], w[1]), n * k // 2),
        "int4+zp": (int4(True), lambda x, w: quant.int4_linear(x, w[0], w[1], w[2]), n * k // 2),
        "fp8": (fp8, lambda x, w: quant.fp8_linear(x, w[0], w[1]), n * k + 4 * n),
        "deq8+cuBLAS": (int8, deq8, n * k + 4 * n),
    }
    for name, (make, fn, approx_bytes) in table.items():
        yield name, pool_of(make, approx_bytes, pool_mb), fn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=_ints, default=[1, 16, 64, 256])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--pool-mb", type=int, default=256)
    default_out = (
        os.path.join(os.environ["OUT"], "bench_quant_cuda.json")
        if "OUT" in os.environ
        else "bench_quant_cuda.json"
    )
    p.add_argument("--output", default=default_out)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_quant_cuda: needs a GPU", file=sys.stderr)
        return 1
    dtype = DTYPES[args.dtype]
    copy = copy_tb_s()
    dev_name = torch.cuda.get_device_name()
    print(f"{dev_name}, torch {torch.__version__}, {args.dtype}; device copy {copy:.2f} TB/s")
    print(
        f"{'shape':>8} {'N x K':>12} {'M':>4} {'method':>12} {'us':>8} {'TB/s':>6} {'x F.lin':>7}"
    )
    rows = []
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        for name, pool, fn in methods(n, k, dtype, args.pool_mb):
            wbytes = nbytes(pool[0])
            for m in args.m:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                try:
                    sec = time_pool(lambda w, x=x, fn=fn: fn(x, w), pool, args.reps)
                except RuntimeError as e:  # e.g. a _scaled_mm form this torch lacks: say so
                    print(f"{shape} {name} M={m}: {type(e).__name__}: {str(e)[:200]}")
                    torch.cuda.synchronize()
                    continue
                rows.append({"shape": shape, "n": n, "k": k, "m": m, "method": name,
                             "us": sec * 1e6, "weight_bytes": wbytes, "tb_s": wbytes / sec / 1e12})  # fmt: skip
            del pool
            torch.cuda.empty_cache()
        base = {r["m"]: r["us"] for r in rows if r["shape"] == shape and r["method"] == "F.linear"}
        for r in rows:
            if r["shape"] == shape:
                r["x_flinear"] = base[r["m"]] / r["us"] if r["m"] in base else float("nan")
        for m in args.m:
            for r in rows:
                if r["shape"] == shape and r["m"] == m:
                    print(f"{shape:>8} {f'{n}x{k}':>12} {m:>4} {r['method']:>12} "
                          f"{r['us']:8.1f} {r['tb_s']:6.2f} {r['x_flinear']:7.2f}")  # fmt: skip
    result = {"device": dev_name, "torch": torch.__version__, "dtype": args.dtype,
              "copy_tb_s": copy, "reps": args.reps, "pool_mb": args.pool_mb, "rows": rows}  # fmt: skip
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
