"""Per-request metrics (Protocol v0.1 names) and engine-wide counters."""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass

import torch

from sagellm.runtime.sequence import Sequence


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory of this process so far: CUDA allocator peak, or peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


@dataclass
class RequestMetrics:
    ttft_ms: float = 0.0  # arrival to first output token
    tbt_ms: float = 0.0  # mean time between output tokens
    tbt_p99_ms: float = 0.0
    tpot_ms: float = 0.0  # (last token - first token) / (tokens - 1)
    throughput_tps: float = 0.0  # output tokens / (finish - arrival)
    e2e_ms: float = 0.0
    queue_ms: float = 0.0  # arrival to first scheduled
    prompt_tokens: int = 0
    output_tokens: int = 0
    kv_used_tokens: int = 0  # tokens held in the cache at the request's peak
    kv_used_bytes: int = 0
    prefix_hit_rate: float = 0.0  # prompt tokens served from the prefix cache / prompt tokens
    peak_mem_mb: float = 0.0
    evict_count: int = 0
    evict_ms: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def request_metrics(
    seq: Sequence, block_size: int, kv_bytes_per_token: int, device: torch.device
) -> RequestMetrics:
    t = seq.times
    end = t.finished or time.monotonic()
    times = t.token_times
    gaps = [b - a for a, b in zip(times, times[1:])]
    n_out = seq.num_output_tokens
    m = RequestMetrics(
        prompt_tokens=seq.num_prompt_tokens,
        output_tokens=n_out,
        e2e_ms=(end - t.arrival) * 1e3,
        queue_ms=((t.first_scheduled or end) - t.arrival) * 1e3,
        kv_used_tokens=min(seq.peak_blocks * block_size, seq.num_tokens),
        kv_used_bytes=seq.peak_blocks * block_size * kv_bytes_per_token,
        prefix_hit_rate=(seq.num_cached_prompt_tokens / seq.num_prompt_tokens)
        if seq.num_prompt_tokens
        else 0.0,
        peak_mem_mb=peak_memory_mb(device),
        evict_count=t.evict_count,
        evict_ms=t.evict_s * 1e3,
    )
    if t.first_token is not None:
        m.ttft_ms = (t.first_token - t.arrival) * 1e3
    if gaps:
        m.tbt_ms = sum(gaps) / len(gaps) * 1e3
        m.tpot_ms = (times[-1] - times[0]) / (len(times) - 1) * 1e3
        s = sorted(gaps)
        m.tbt_p99_ms = s[min(len(s) - 1, int(0.99 * len(s)))] * 1e3
    if end > t.arrival and n_out:
        m.throughput_tps = n_out / (end - t.arrival)
    return m


@dataclass
class EngineCounters:
    requests_added: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    preemptions: int = 0
