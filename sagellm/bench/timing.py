"""Timing primitives for the op microbenchmarks: device sync, a per-call timer, copy bandwidth.

Every figure here is measured; nothing is derived from a spec sheet. On CUDA each call is
bracketed by events (the GPU's own clock, no host launch jitter); on the CPU by perf_counter_ns.
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


def _time_calls_cuda(fn: Callable[[], object], iters: int, device: torch.device) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends, strict=True):
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
