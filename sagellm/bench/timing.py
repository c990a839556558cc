"""Timing primitives for the op microbenchmarks: device sync, a per-call timer, copy bandwidth
and the dense GEMM rate (the two rooflines the benchmarks compare against).

Every figure here is measured; nothing is derived from a spec sheet. On CUDA each call is
bracketed by events (the GPU's own clock) and preceded by a write over a buffer several times the
L2 cache: that evicts the previous call's inputs, so an op is timed from memory as in a model
step (weights, KV and activations of a real step do not stay in L2), and the GPU is busy with the
flush while the host launches the call, so host launch overhead is not timed either. On the CPU
calls are timed with perf_counter_ns.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# With --iters left out, each callable gets about this much timed work after warm-up, within
# [AUTO_MIN_ITERS, AUTO_MAX_ITERS] calls: enough for a stable median on fast ops without letting
# a slow pure-torch reference stall a sweep.
AUTO_BUDGET_S = 1.0
AUTO_MIN_ITERS = 3
AUTO_MAX_ITERS = 200
# Bytes written before each timed CUDA call: H100/H200 have 50/60 MB of L2.
L2_FLUSH_BYTES = 256 * 2**20

_flush_buffers: dict[torch.device, torch.Tensor] = {}


@dataclass(frozen=True)
class Timing:
    """Wall times of repeated calls of one callable, in milliseconds."""

    median_ms: float
    min_ms: float
    iters: int

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> Timing:
        if not samples_ms:
            raise ValueError("no timing samples: iters must be at least 1")
        return cls(statistics.median(samples_ms), min(samples_ms), len(samples_ms))


def synchronize(device: torch.device) -> None:
    """Wait until all work queued on `device` has finished (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls_cpu(fn: Callable[[], object], iters: int) -> list[float]:
    samples = []
    for _ in range(iters):
        start = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return samples


def _l2_flush(device: torch.device) -> torch.Tensor:
    key = torch.device(device.type, device.index if device.index is not None else 0)
    if key not in _flush_buffers:
        _flush_buffers[key] = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=key)
    return _flush_buffers[key]


def _time_calls_cuda(fn: Callable[[], object], iters: int, device: torch.device) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    flush = _l2_flush(device)
    for start, end in zip(starts, ends, strict=True):
        flush.zero_()
        start.record()
        fn()
        end.record()
    synchronize(device)
    return [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]


def _time_calls(fn: Callable[[], object], iters: int, device: torch.device) -> list[float]:
    synchronize(device)
    if device.type == "cuda":
        return _time_calls_cuda(fn, iters, device)
    return _time_calls_cpu(fn, iters)


def time_callable(
    fn: Callable[[], object], device: torch.device, *, warmup: int, iters: int | None
) -> Timing:
    """Time `fn()` after `warmup` untimed calls.

    iters=None (auto) picks the count from the first timed call so the timed work lasts about
    AUTO_BUDGET_S, and cuts the warm-up short once it has taken that long (a slow reference
    needs no second warm-up call).
    """
    if iters is not None and iters < 1:
        raise ValueError(f"iters = {iters} must be at least 1")
    warmup_start = time.perf_counter()
    for _ in range(warmup):
        fn()
        if iters is None and time.perf_counter() - warmup_start > AUTO_BUDGET_S:
            break
    if iters is not None:
        return Timing.from_samples(_time_calls(fn, iters, device))
    samples = _time_calls(fn, 1, device)
    wanted = int(AUTO_BUDGET_S * 1e3 / max(samples[0], 1e-6))
    iters = min(AUTO_MAX_ITERS, max(AUTO_MIN_ITERS, wanted))
    return Timing.from_samples(samples + _time_calls(fn, iters - 1, device))


def copy_bandwidth_gb_s(device: torch.device, *, mib: int = 256, repeats: int = 5) -> float:
    """Best-of-`repeats` bandwidth of dst.copy_(src) for two `mib`-MiB buffers, in GB/s (1e9).

    A copy reads and writes each byte once, so it moves 2 * size bytes. The buffers should be
    well past the last-level cache so this is the memory roofline; copy_ on the CPU runs on
    torch's intra-op thread pool, so it reflects the thread count set at the time.
    """
    if mib < 1:
        raise ValueError(f"copy buffer size {mib} MiB must be at least 1")
    numel = mib * (1 << 20) // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = time_callable(lambda: dst.copy_(src), device, warmup=1, iters=repeats)
    return 2 * src.numel() * src.element_size() / (timing.min_ms * 1e-3) / 1e9


def gemm_tflops(
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    *,
    n: int | None = None,
    repeats: int = 5,
) -> float:
    """Best-of-`repeats` rate of an n x n x n torch.matmul in `dtype`, in TFLOP/s (2 n^3 FLOPs
    per call): the dense tensor-core roofline that compute-bound kernels are compared against.
    n defaults to 8192 on CUDA (1.1 TFLOP, past any tile-quantisation effect) and 1024 on the
    CPU (a few hundred ms at most)."""
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    if n < 1:
        raise ValueError(f"GEMM size {n} must be at least 1")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    timing = time_callable(lambda: torch.matmul(a, b, out=out), device, warmup=2, iters=repeats)
    return 2 * n**3 / (timing.min_ms * 1e-3) / 1e12
