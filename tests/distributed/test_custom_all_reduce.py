"""The custom CUDA all-reduce (IPC peer buffers, one-shot / two-shot) against the sum of the
ranks' tensors, over sizes on both sides of the one-shot threshold, every dtype, and under CUDA
graph replay.

Two GPUs: one rank per GPU. One GPU (SAGELLM_CUSTOM_AR_ONE_GPU=1): two processes on the same GPU
share buffers through IPC as well; their kernels run time-sliced rather than concurrently, so
each barrier waits for a context switch (slow, still correct). The handles travel over gloo, so
no NCCL (which refuses two ranks on one GPU) is involved.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed.spawn import run_ranks
from tests.ops.tolerances import tol

SIZES = [16, 4096, 64 * 1024, 256 * 1024, 256 * 1024 + 16, 1024 * 1024, 8 * 2**20]  # bytes
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _body(rank: int, world: int, one_gpu: bool) -> None:
    import torch.distributed as dist

    from sagellm.distributed.custom_ar import CustomAllReduce

    device = torch.device("cuda", 0 if one_gpu else rank)
    torch.cuda.set_device(device)
    ar = CustomAllReduce(rank, world, device, exchange_group=dist.group.WORLD)
    for dtype in DTYPES:
        for nbytes in SIZES:
            n = nbytes // torch.empty((), dtype=dtype).element_size()
            g = torch.Generator().manual_seed(17)
            inputs = [torch.randn(n, generator=g).to(dtype) for _ in range(world)]
            expected = sum(t.float() for t in inputs).to(dtype)
            x = inputs[rank].to(device)
            assert ar.takes(x), (dtype, nbytes)
            out = torch.full_like(x, float("nan"))
            ar.all_reduce(x, out)
            torch.cuda.synchronize()
            torch.testing.assert_close(out.cpu(), expected, **tol(dtype), msg=f"{dtype} {nbytes} B")
            torch.testing.assert_close(x.cpu(), inputs[rank], atol=0, rtol=0, msg="input changed")
    # CUDA graph: capture once, replay with new inputs; the barrier counters live on the device.
    x = torch.zeros(4096, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(x)
    ar.all_reduce(x, out)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ar.all_reduce(x, out)
    for step in range(3):
        x.fill_(float(rank + 1 + step))
        graph.replay()
        torch.cuda.synchronize()
        want = sum(r + 1 + step for r in range(world))
        assert torch.all(out == want).item(), f"replay {step}: {out[:4].tolist()} != {want}"
    assert not ar.takes(torch.zeros(3, device=device))  # 12 bytes: not a multiple of 16
    dist.barrier()


def _available() -> bool:
    if not torch.cuda.is_available():
        return False
    from sagellm.distributed.custom_ar import available

    return available()


@pytest.mark.skipif(
    not _available() or torch.cuda.device_count() < 2,
    reason="needs 2 GPUs and a CUDA build of sagellm._C",
)
def test_custom_all_reduce_two_gpus():
    run_ranks(_body, False)


@pytest.mark.skipif(
    not _available() or os.environ.get("SAGELLM_CUSTOM_AR_ONE_GPU") != "1",
    reason="two processes on one GPU: set SAGELLM_CUSTOM_AR_ONE_GPU=1 on a GPU machine",
)
def test_custom_all_reduce_two_processes_one_gpu():
    run_ranks(_body, True)
