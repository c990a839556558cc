"""All-reduce latency on 2+ GPUs: the custom IPC all-reduce against NCCL in the same run.

    torchrun --nproc-per-node 2 benchmarks/comm/bench_all_reduce.py [--json out.json]

Per size (8 KB .. 8 MB, bf16): median microseconds of each, replayed from CUDA graphs of 20
back-to-back calls (launch overhead excluded, as in a captured decode step), and custom / NCCL.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from sagellm.distributed.custom_ar import CustomAllReduce
from sagellm.distributed.group import TPGroup, init_distributed

SIZES_KB = [8, 16, 32, 64, 128, 256, 512, 1024, 4096, 8192]
CALLS = 20


def time_graph(fn, reps: int = 50) -> float:
    """Median microseconds per call of fn, from a CUDA graph of CALLS calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    init_distributed(rank, world, device)
    tp = TPGroup.world()
    gloo = dist.new_group(backend="gloo")
    ar = CustomAllReduce(rank, world, device, exchange_group=gloo)
    rows = []
    for kb in SIZES_KB:
        x = torch.randn(kb * 1024 // 2, device=device, dtype=torch.bfloat16)
        out = torch.empty_like(x)
        nccl = time_graph(lambda x=x: dist.all_reduce(x, group=tp.group))
        custom = time_graph(lambda x=x, out=out: ar.all_reduce(x, out)) if ar.takes(x) else None
        rows.append({"kb": kb, "nccl_us": nccl, "custom_us": custom})
    if rank == 0:
        print(f"{'size':>8} {'NCCL us':>9} {'custom us':>10} {'ratio':>6}")
        for r in rows:
            c = r["custom_us"]
            ratio = f"{c / r['nccl_us']:.2f}" if c else "-"
            print(f"{r['kb']:>6}KB {r['nccl_us']:>9.1f} {c or float('nan'):>10.1f} {ratio:>6}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
