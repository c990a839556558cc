"""Collectives (all_reduce, all_gather, broadcast) in 2 processes against torch.distributed's own
on the same group: gloo on the CPU (runs in CI), NCCL on CUDA (needs 2 GPUs).

The processes are spawned once per device; each runs the whole matrix (op x dtype x size, from
one element to 64 MB once) and the bad-input cases, records what failed, and the parametrized
tests below report each case.
"""

from __future__ import annotations

import json
import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from tests.ops.tolerances import tol

WORLD = 2
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64]
SIZES = [1, 4099, 131072]  # elements: one, an odd count, 512 KB of fp32
BIG = 16 * 2**20  # 64 MB of fp32, all_reduce only (once)
OPS = ["all_reduce", "all_gather", "broadcast"]


def _cases() -> list[tuple[str, torch.dtype, int]]:
    cases = [(op, dt, n) for op in OPS for dt in DTYPES for n in SIZES]
    return cases + [("all_reduce", torch.float32, BIG)]


def _case_id(op: str, dtype: torch.dtype, n: int) -> str:
    return f"{op}-{str(dtype).removeprefix('torch.')}-{n}"


BAD_INPUTS = {
    "unknown_group": "names no torch.distributed process group",
    "non_contiguous": "must be contiguous",
    "bad_dtype": "has dtype",
    "gather_out_shape": "all_gather: out has shape",
    "gather_dtype": "all_gather: out has dtype",
    "broadcast_src": "broadcast: src = 2 is out of range [0, 2)",
}


def _random(n: int, dtype: torch.dtype, gen: torch.Generator, device: str) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(n, generator=gen).to(dtype).to(device)
    return torch.randint(-1000, 1000, (n,), generator=gen, dtype=dtype).to(device)


def _check(op: str, dtype: torch.dtype, n: int, rank: int, device: str, name: str) -> None:
    from sagellm.ops import comm
    from sagellm.ops.reference import comm as ref

    gen = torch.Generator().manual_seed(1000 * rank + n)
    x = _random(n, dtype, gen, device)
    exact = dict(atol=0, rtol=0) if not dtype.is_floating_point else tol(dtype)
    if op == "all_reduce":
        expected = ref.all_reduce(x, name)
        got = comm.all_reduce(x.clone(), name)
    elif op == "all_gather":
        expected = ref.all_gather(x, name)
        out = torch.full((WORLD * n,), 7, dtype=dtype, device=device)
        if dtype.is_floating_point:
            out.fill_(float("nan"))
        before = x.clone()
        got = comm.all_gather(x, name, out=out)
        torch.testing.assert_close(x, before, atol=0, rtol=0, msg="all_gather wrote its input")
    else:
        expected = ref.broadcast(x, 1, name)
        got = comm.broadcast(x.clone(), 1, name)
    torch.testing.assert_close(got, expected, **exact)


def _bad_input(case: str, device: str, name: str) -> None:
    from sagellm.ops import comm

    if case == "unknown_group":
        comm.all_reduce(torch.zeros(4, device=device), "no-such-group")
    elif case == "non_contiguous":
        comm.all_reduce(torch.zeros(4, 4, device=device).t(), name)
    elif case == "bad_dtype":
        comm.all_reduce(torch.zeros(4, dtype=torch.uint8, device=device), name)
    elif case == "gather_out_shape":
        comm.all_gather(torch.zeros(4, device=device), name, out=torch.zeros(7, device=device))
    elif case == "gather_dtype":
        out = torch.zeros(8, dtype=torch.float16, device=device)
        comm.all_gather(torch.zeros(4, device=device), name, out=out)
    elif case == "broadcast_src":
        comm.broadcast(torch.zeros(4, device=device), 2, name)


def _worker(rank: int, port: int, device: str, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    import sagellm  # noqa: F401

    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(
        "nccl" if device.startswith("cuda") else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    name = dist.group.WORLD.group_name
    results: dict[str, str | None] = {}
    try:
        for op, dt, n in _cases():
            try:
                _check(op, dt, n, rank, device, name)
                results[_case_id(op, dt, n)] = None
            except AssertionError as e:
                results[_case_id(op, dt, n)] = str(e)[:2000]
        for case, needle in BAD_INPUTS.items():
            try:
                _bad_input(case, device, name)
                results[case] = "no error raised"
            except RuntimeError as e:
                results[case] = None if needle in str(e) else f"wrong message: {e}"[:2000]
    except Exception:
        results["crash"] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def _run(device: str, tmp_path_factory) -> list[dict]:
    from sagellm.distributed.group import free_port

    out_dir = str(tmp_path_factory.mktemp(f"comm-{device}"))
    mp.spawn(_worker, args=(free_port(), device, out_dir), nprocs=WORLD, join=True)
    results = []
    for r in range(WORLD):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            results.append(json.load(f))
    return results


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory):
    return _run("cpu", tmp_path_factory)


two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="NCCL collectives need 2 GPUs (NCCL refuses two ranks on one GPU)",
)


@pytest.fixture(scope="module")
def cuda_results(tmp_path_factory):
    return _run("cuda", tmp_path_factory)


ALL_IDS = [_case_id(*c) for c in _cases()] + list(BAD_INPUTS)


def _assert_case(results: list[dict], case: str) -> None:
    for rank, res in enumerate(results):
        assert "crash" not in res, f"rank {rank} crashed:\n{res['crash']}"
        assert case in res, f"rank {rank} did not run {case}"
        assert res[case] is None, f"rank {rank}: {res[case]}"


@pytest.mark.parametrize("case", ALL_IDS)
def test_comm_cpu_gloo(cpu_results, case):
    _assert_case(cpu_results, case)


@two_gpus
@pytest.mark.parametrize("case", ALL_IDS)
def test_comm_cuda_nccl(cuda_results, case):
    _assert_case(cuda_results, case)
