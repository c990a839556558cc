"""Run a function on 2 gloo ranks (torch.multiprocessing spawn, one torch thread each); a failed
assertion on any rank fails the calling test with that rank's traceback."""

from __future__ import annotations

import datetime

import torch
import torch.multiprocessing as mp


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, *args, world: int = 2) -> None:
    """fn(rank, world, *args) on every rank of a fresh gloo group (fn must be importable)."""
    from sagellm.distributed.group import free_port

    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
