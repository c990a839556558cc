"""Device check and benchmark of sageLLM's CUDA small ops (everything but attention).

Run on the GPU machine after building sagellm._C with SAGELLM_CUDA=ON:

    python tools/device/smallops_bench_check.py [--output PATH] [--ops a,b] [--iters 50] [--quick]

For each op at a large shape (a Llama-3-8B layer over 8192 tokens, bf16):
1. Check: one call against the pure-torch reference (sagellm.ops.reference, run on the GPU),
   outputs poisoned with NaN first; tolerances of tests/ops/tolerances.py, exact for the cache
   ops. Prints the max error and PASS / FAIL.
2. Time: CUDA events around each call, median of --iters after warm-up, the L2 cache flushed
   (a 256 MiB memset, outside the timed region) before every call so no input is read from a
   previous call's L2. Achieved GB/s counts each byte the op must read or write once; the
   ceiling is the device copy bandwidth measured in the same run (copy_ of a 1 GiB tensor into
   another, read + write bytes). The issue's target for the memory-bound ops is 0.85 x copy.
3. Baseline: the same call in pure torch, timed the same way: the reference functions for the
   norms and rotary (fp32 math, as the kernels); for the gated activations the same math in the
   dtype (their reference computes in fp64, an oracle rather than a baseline); for the cache
   ops an equivalent vectorised torch expression (their references loop in Python).
dense_linear (cuBLAS through ATen) is reported against F.linear at a decode shape (GB/s of
weight streamed) and a prefill shape (TFLOP/s); swap_blocks against a plain pinned-host copy of
the same bytes (PCIe, not HBM). A table is printed last; --output writes everything as JSON.
Exit status 1 when any check fails or any case raises.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import sagellm  # noqa: E402,F401  (registers torch.ops.sagellm)
from sagellm.ops import activation, cache, linear, norm, rotary  # noqa: E402
from sagellm.ops.reference import activation as ref_act  # noqa: E402
from sagellm.ops.reference import linear as ref_linear  # noqa: E402
from sagellm.ops.reference import norm as ref_norm  # noqa: E402
from sagellm.ops.reference import rotary as ref_rotary  # noqa: E402
from tests.ops.tolerances import tol  # noqa: E402

DEV = "cuda"
EPS = 1e-6
TARGET = 0.85
# The memory-bound ops the issue sets the 0.85 x copy target for.
TARGETED = {
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "reshape_and_cache",
    "copy_blocks",
}


class Timer:
    """Median CUDA-event time of fn(), with the L2 flushed before each call."""

    def __init__(self, iters: int, warmup: int):
        self.iters, self.warmup = iters, warmup
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn, iters: int | None = None) -> float:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters or self.iters):
            self.flush.zero_()
            self.start.record()
            fn()
            self.end.record()
            self.end.synchronize()
            times.append(self.start.elapsed_time(self.end))
        return statistics.median(times)  # ms


def copy_bandwidth(timer: Timer) -> float:
    """GB/s of a device-to-device copy of 1 GiB (bytes read + written)."""
    src = torch.randn(1 << 29, device=DEV, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), iters=20)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item()


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.allclose(got, want, **tol(got.dtype)) and not got.isnan().any().item()


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


# ---- cases: each returns a dict with check, kernel / baseline callables and bytes --------------


def case_rms_norm(t, h, dtype):
    x = torch.randn(t, h, device=DEV, generator=gen(1)).to(dtype)
    w = (1 + 0.5 * torch.randn(h, device=DEV, generator=gen(2))).to(dtype)
    out = torch.full_like(x, float("nan"))
    norm.rms_norm(x, w, EPS, out=out)
    want = ref_norm.rms_norm(x, w, EPS)
    return {
        "shape": f"[{t}, {h}]",
        "ok": close(out, want),
        "err": max_err(out, want),
        "run": lambda: norm.rms_norm(x, w, EPS, out=out),
        "torch": lambda: ref_norm.rms_norm(x, w, EPS),
        "bytes": 2 * x.nbytes + w.nbytes,
    }


def case_fused_add_rms_norm(t, h, dtype):
    x = torch.randn(t, h, device=DEV, generator=gen(3)).to(dtype)
    r = torch.randn(t, h, device=DEV, generator=gen(4)).to(dtype)
    w = (1 + 0.5 * torch.randn(h, device=DEV, generator=gen(5))).to(dtype)
    x0, r0 = x.clone(), r.clone()
    want, want_r = ref_norm.fused_add_rms_norm(x, r, w, EPS)
    norm.fused_add_rms_norm(x, r, w, EPS)
    return {
        "shape": f"[{t}, {h}]",
        "ok": close(x, want) and torch.equal(r, want_r),
        "err": max(max_err(x, want), max_err(r, want_r)),
        "run": lambda: norm.fused_add_rms_norm(x, r, w, EPS),
        "torch": lambda: ref_norm.fused_add_rms_norm(x0, r0, w, EPS),
        "bytes": 4 * x.nbytes + w.nbytes,
    }


def case_rotary_embedding(t, heads, kv_heads, d, dtype):
    max_pos = 16384
    positions = torch.randint(0, max_pos, (t,), device=DEV, generator=gen(6))
    q = torch.randn(t, heads * d, device=DEV, generator=gen(7)).to(dtype)
    k = torch.randn(t, kv_heads * d, device=DEV, generator=gen(8)).to(dtype)
    cs = rotary.make_cos_sin_cache(d, max_pos).to(DEV)
    want_q, want_k = ref_rotary.rotary_embedding(positions, q, k, d, cs, True)
    q0, k0 = q.clone(), k.clone()
    rotary.rotary_embedding(positions, q, k, d, cs, True)
    ok = close(q, want_q) and close(k, want_k)
    err = max(max_err(q, want_q), max_err(k, want_k))
    return {
        "shape": f"{t} tok, {heads}/{kv_heads} heads x {d}, neox",
        "ok": ok,
        "err": err,
        "run": lambda: rotary.rotary_embedding(positions, q, k, d, cs, True),
        "torch": lambda: ref_rotary.rotary_embedding(positions, q0, k0, d, cs, True),
        "bytes": 2 * (q.nbytes + k.nbytes) + positions.nbytes + t * d * cs.element_size(),
    }


def case_gated(t, d, dtype, approximate=None):
    x = (3 * torch.randn(t, 2 * d, device=DEV, generator=gen(9))).to(dtype)
    out = torch.full((t, d), float("nan"), device=DEV, dtype=dtype)
    if approximate is None:
        run = lambda: activation.silu_and_mul(x, out=out)  # noqa: E731
        baseline = lambda: ref_act.silu_and_mul(x)  # noqa: E731
    else:
        run = lambda: activation.gelu_and_mul(x, approximate, out=out)  # noqa: E731
        baseline = lambda: ref_act.gelu_and_mul(x, approximate)  # noqa: E731
    run()
    want = baseline()
    return {
        "shape": f"[{t}, 2 x {d}]" + (f", {approximate}" if approximate else ""),
        "ok": close(out, want),
        "err": max_err(out, want),
        "run": run,
        # The fp64 reference is the test oracle; the baseline is the same math in the dtype.
        "torch": (lambda: F.silu(x[:, :d]) * x[:, d:])
        if approximate is None
        else (lambda: F.gelu(x[:, :d], approximate=approximate) * x[:, d:]),
        "bytes": x.nbytes + out.nbytes,
    }


def case_reshape_and_cache(t, kv_heads, d, num_blocks, dtype):
    block_size = 16
    key = torch.randn(t, kv_heads, d, device=DEV, generator=gen(10)).to(dtype)
    value = torch.randn(t, kv_heads, d, device=DEV, generator=gen(11)).to(dtype)
    slots = torch.randperm(num_blocks * block_size, device=DEV, generator=gen(12))[:t]
    slots[::97] = -1  # padding tokens
    kc = torch.zeros(num_blocks, block_size, kv_heads, d, device=DEV, dtype=dtype)
    vc = torch.zeros_like(kc)
    cache.reshape_and_cache(key, value, kc, vc, slots)
    keep = slots >= 0
    flat_k, flat_v = kc.view(-1, kv_heads, d), vc.view(-1, kv_heads, d)
    ok = torch.equal(flat_k[slots[keep]], key[keep]) and torch.equal(
        flat_v[slots[keep]], value[keep]
    )
    written = int(keep.sum().item())
    ok = ok and int((flat_k.abs().sum((1, 2)) != 0).sum().item()) <= written

    def baseline():
        flat_k[slots[keep]] = key[keep]
        flat_v[slots[keep]] = value[keep]

    return {
        "shape": f"{t} tok x {kv_heads} x {d} -> {num_blocks} blocks of {block_size}",
        "ok": ok,
        "err": 0.0 if ok else float("nan"),
        "run": lambda: cache.reshape_and_cache(key, value, kc, vc, slots),
        "torch": baseline,
        "bytes": 2 * (key.nbytes + value.nbytes) * written // t + slots.nbytes,
    }


def case_copy_blocks(pairs, layers, num_blocks, kv_heads, d, dtype):
    shape = (num_blocks, 16, kv_heads, d)
    kcs = [torch.randn(shape, device=DEV, generator=gen(20 + i)).to(dtype) for i in range(layers)]
    vcs = [torch.randn(shape, device=DEV, generator=gen(90 + i)).to(dtype) for i in range(layers)]
    perm = torch.randperm(num_blocks, device=DEV, generator=gen(13))
    src, dst = perm[:pairs], perm[pairs : 2 * pairs]
    mapping = torch.stack([src, dst], dim=1).contiguous()
    before = [c[src].clone() for c in kcs + vcs]
    cache.copy_blocks(kcs, vcs, mapping)
    ok = all(
        torch.equal(c[dst], b) and torch.equal(c[src], b)
        for c, b in zip(kcs + vcs, before, strict=True)
    )
    del before
    mapping_cpu = mapping.cpu()

    def baseline():
        for c in kcs + vcs:
            c.index_copy_(0, dst, c.index_select(0, src))

    block_bytes = kcs[0][0].nbytes
    return {
        "shape": f"{pairs} pairs x {layers} layers (K+V), blocks of {block_bytes >> 10} KiB",
        "ok": ok,
        "err": 0.0 if ok else float("nan"),
        "run": lambda: cache.copy_blocks(kcs, vcs, mapping),
        "run_host_mapping": lambda: cache.copy_blocks(kcs, vcs, mapping_cpu),
        "torch": baseline,
        "bytes": 2 * pairs * 2 * layers * block_bytes,
    }


def case_swap_blocks(pairs, num_blocks, kv_heads, d, dtype, to_host):
    shape = (num_blocks, 16, kv_heads, d)
    gpu = torch.randn(shape, device=DEV, generator=gen(14)).to(dtype)
    host = torch.zeros(shape, dtype=dtype).pin_memory()
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(15))
    mapping = torch.stack([perm[:pairs], perm[pairs : 2 * pairs]], dim=1).contiguous()
    src, dst = (gpu, host) if to_host else (host, gpu)
    if not to_host:
        host.copy_(gpu.cpu())
        gpu.zero_()
    cache.swap_blocks(src, dst, mapping)
    torch.cuda.synchronize()
    s_idx, d_idx = mapping[:, 0], mapping[:, 1]
    ok = torch.equal(dst[d_idx.to(dst.device)].cpu(), src[s_idx.to(src.device)].cpu())
    block_bytes = gpu[0].nbytes
    staged = torch.empty(pairs, *shape[1:], dtype=dtype).pin_memory()
    staged_gpu = torch.empty(pairs, *shape[1:], dtype=dtype, device=DEV)

    def plain_copy():  # the same bytes in one contiguous transfer: the link's ceiling
        if to_host:
            staged.copy_(staged_gpu, non_blocking=True)
        else:
            staged_gpu.copy_(staged, non_blocking=True)

    return {
        "shape": f"{pairs} random blocks of {block_bytes >> 10} KiB, "
        + ("GPU -> pinned host" if to_host else "pinned host -> GPU"),
        "ok": ok,
        "err": 0.0 if ok else float("nan"),
        "run": lambda: cache.swap_blocks(src, dst, mapping),
        "torch": plain_copy,
        "bytes": pairs * block_bytes,  # each byte crosses the link once
        "ceiling": "pinned copy",
    }


def case_dense_linear(m, n, k, dtype):
    x = torch.randn(m, k, device=DEV, generator=gen(16)).to(dtype)
    w = (torch.randn(n, k, device=DEV, generator=gen(17)) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, device=DEV, generator=gen(18)).to(dtype)
    out = torch.full((m, n), float("nan"), device=DEV, dtype=dtype)
    linear.dense_linear(x, w, b, out=out)
    want = ref_linear.dense_linear(x, w, b)
    return {
        "shape": f"M={m} N={n} K={k}",
        "ok": close(out, want),
        "err": max_err(out, want),
        "run": lambda: linear.dense_linear(x, w, b, out=out),
        "torch": lambda: F.linear(x, w, b),
        "bytes": x.nbytes + w.nbytes + b.nbytes + out.nbytes,
        "flops": 2 * m * n * k,
    }


def cases(quick: bool):
    """(name, builder) pairs; shapes of a Llama-3-8B layer over 8192 tokens."""
    t = 512 if quick else 8192
    bf16 = torch.bfloat16
    return [
        ("rms_norm", lambda: case_rms_norm(t, 4096, bf16)),
        ("fused_add_rms_norm", lambda: case_fused_add_rms_norm(t, 4096, bf16)),
        ("rotary_embedding", lambda: case_rotary_embedding(t, 32, 8, 128, bf16)),
        ("silu_and_mul", lambda: case_gated(t, 14336, bf16)),
        ("gelu_and_mul", lambda: case_gated(t, 14336, bf16, "tanh")),
        ("gelu_and_mul(erf)", lambda: case_gated(t, 14336, bf16, "none")),
        ("rms_norm(fp32)", lambda: case_rms_norm(t, 4096, torch.float32)),
        ("rms_norm(5128)", lambda: case_rms_norm(t, 5128, bf16)),
        ("reshape_and_cache", lambda: case_reshape_and_cache(t, 8, 128, 65536, bf16)),
        (
            "copy_blocks",
            lambda: case_copy_blocks(
                128 if quick else 1024, 4 if quick else 24, 4096, 8, 128, bf16
            ),
        ),
        ("swap_blocks(d2h)", lambda: case_swap_blocks(1024, 4096, 8, 128, bf16, True)),
        ("swap_blocks(h2d)", lambda: case_swap_blocks(1024, 4096, 8, 128, bf16, False)),
        ("dense_linear(decode)", lambda: case_dense_linear(16, 14336, 4096, bf16)),
        ("dense_linear(prefill)", lambda: case_dense_linear(t, 4096, 4096, bf16)),
    ]


def measure(name, build, timer, copy_gbps):
    c = build()
    row = {"op": name, "shape": c["shape"], "check": "PASS" if c["ok"] else "FAIL"}
    row["max_err"] = c["err"]
    ms = timer(c["run"])
    torch_ms = timer(c["torch"], iters=min(timer.iters, 20))
    row.update(kernel_us=ms * 1e3, torch_us=torch_ms * 1e3, bytes=c["bytes"])
    row["gbps"] = c["bytes"] / ms / 1e6
    row["speedup_vs_torch"] = torch_ms / ms
    if "flops" in c:
        row["tflops"] = c["flops"] / ms / 1e9
    if c.get("ceiling") == "pinned copy":
        row["ratio"] = torch_ms / ms  # the baseline here is the plain pinned copy
        row["ratio_of"] = "pinned copy"
    else:
        row["ratio"] = row["gbps"] / copy_gbps
        row["ratio_of"] = "device copy"
    if "run_host_mapping" in c:
        row["kernel_us_host_mapping"] = timer(c["run_host_mapping"]) * 1e3
    if name in TARGETED:
        row["target_met"] = row["ratio"] >= TARGET
    return row


def print_table(rows, copy_gbps, device):
    print(f"\n{device}: device copy {copy_gbps:.0f} GB/s (read + write); target {TARGET} x copy")
    head = f"{'op':22} {'check':5} {'kernel us':>10} {'GB/s':>7} {'ratio':>6} {'torch us':>10} "
    head += f"{'x torch':>7}  target  shape"
    print(head)
    for r in rows:
        if "error" in r:
            print(f"{r['op']:22} ERROR  {r['error']}")
            continue
        tgt = {True: "met", False: "MISSED"}.get(r.get("target_met"), "-")
        extra = f", {r['tflops']:.0f} TFLOP/s" if "tflops" in r else ""
        ratio = f"{r['ratio']:.2f}" + ("*" if r["ratio_of"] != "device copy" else "")
        print(
            f"{r['op']:22} {r['check']:5} {r['kernel_us']:10.1f} {r['gbps']:7.0f} {ratio:>6} "
            f"{r['torch_us']:10.1f} {r['speedup_vs_torch']:7.2f}  {tgt:6}  {r['shape']}{extra}"
        )
    print("ratio: achieved / device copy bandwidth; * = / a plain pinned host copy (PCIe)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", help="JSON file for the results")
    p.add_argument("--ops", help="comma-separated subset of op names (default: all)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or not sagellm.ops.build_info()["cuda"]:
        print("needs a GPU and sagellm built with its CUDA kernels")
        return 1

    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.cuda.get_device_name()
    timer = Timer(args.iters, args.warmup)
    copy_gbps = copy_bandwidth(timer)
    wanted = set(args.ops.split(",")) if args.ops else None
    rows = []
    for name, build in cases(args.quick):
        if wanted and name not in wanted:
            continue
        try:
            rows.append(measure(name, build, timer, copy_gbps))
        except Exception as e:  # keep going: one broken op must not hide the others' numbers
            traceback.print_exc()
            rows.append({"op": name, "error": f"{type(e).__name__}: {e}"})
        torch.cuda.empty_cache()
        r = rows[-1]
        print(json.dumps({k: v for k, v in r.items() if k != "shape"}), flush=True)

    result = {
        "device": device,
        "torch": torch.__version__,
        "copy_gbps": copy_gbps,
        "target_ratio": TARGET,
        "iters": args.iters,
        "rows": rows,
    }
    output = args.output
    if output is None and os.environ.get("OUT"):
        output = os.path.join(os.environ["OUT"], "smallops_bench.json")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2))
    print_table(rows, copy_gbps, device)
    failed = [r["op"] for r in rows if "error" in r or r.get("check") != "PASS"]
    if failed:
        print("FAILED:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
