"""The tensor-parallel group: process-group setup and the collectives a model layer calls.

A rank joins the group either from a torchrun-style environment (env://: RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, LOCAL_RANK) or with an explicit tcp:// address when the engine spawns
its own workers. gloo serves CPU tensors, NCCL CUDA tensors. Every collective has a timeout: the
one given to init_process_group (60 s by default), so a dead or hung peer raises instead of
blocking forever.

Layers get a `TPGroup` at construction and call its all_reduce / all_gather, which go through the
native sagellm ops (torch.distributed's process group, resolved by name in C++), or through the
custom CUDA all-reduce for small messages when one was set up (sagellm.distributed.custom_ar).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sagellm.ops import comm as comm_ops

DEFAULT_TIMEOUT_S = 60.0
# Joining takes as long as the slowest rank's start-up (a spawned worker imports torch first):
# the rendezvous gets at least this long; the collectives get the TP group's own timeout.
RENDEZVOUS_TIMEOUT_S = 300.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` (by default the loopback interface) now: for a single-host
    rendezvous, or the port a spawned engine server listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def env_launch() -> tuple[int, int] | None:
    """(rank, world_size) when this process was started by torchrun (or any env:// launcher)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def exact_reduce(device: torch.device | str) -> bool:
    """Whether row-parallel layers run exactly (TPGroup.exact): SAGELLM_TP_REDUCE=gather or
    allreduce decides; by default exact on the CPU (where tensor parallelism serves fidelity and
    the int8 activation blocks of GGUF kernels would amplify summation-order differences into
    different tokens) and all-reduce on CUDA (one collective per layer, the custom all-reduce)."""
    mode = os.environ.get("SAGELLM_TP_REDUCE", "")
    if mode not in ("", "gather", "allreduce"):
        raise ValueError(f"SAGELLM_TP_REDUCE = {mode!r} is invalid: expected gather or allreduce")
    if mode:
        return mode == "gather"
    return torch.device(device).type != "cuda"


def init_distributed(
    rank: int,
    world_size: int,
    device: torch.device | str,
    init_method: str = "env://",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Join the default process group (gloo on the CPU, NCCL on CUDA) unless it exists.

    timeout_s bounds the rendezvous (at least RENDEZVOUS_TIMEOUT_S) and the default group's
    collectives; `TPGroup.create` makes a group whose collectives have exactly timeout_s."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s = {timeout_s} is invalid: expected > 0")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank = {rank} is out of range [0, {world_size})")
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(
                f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}; asked for rank {rank} of {world_size}"
            )
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(
        backend_for(dev),
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=max(timeout_s, RENDEZVOUS_TIMEOUT_S)),
        device_id=dev if dev.type == "cuda" else None,
    )


@dataclass
class TPGroup:
    """One rank's view of its tensor-parallel group.

    group_name: the torch.distributed group's name, as the native comm ops take it.
    custom_ar: a CustomAllReduce (CUDA, small messages) or None.
    exact: row-parallel layers hold output rows and all-gather inputs and outputs instead of
        all-reducing partial sums, so every output element is computed as on one process and the
        model's output is bit-identical to it (two all-gathers instead of one all-reduce each).
    """

    rank: int
    size: int
    group_name: str
    group: dist.ProcessGroup | None = field(default=None, repr=False)
    custom_ar: object | None = field(default=None, repr=False)
    exact: bool = False

    @classmethod
    def world(cls) -> TPGroup:
        """The default process group as the TP group (one model over every rank)."""
        g = dist.group.WORLD
        return cls(dist.get_rank(), dist.get_world_size(), g.group_name, g)

    @classmethod
    def create(cls, timeout_s: float = DEFAULT_TIMEOUT_S) -> TPGroup:
        """A new group of every rank whose collectives time out after timeout_s (collective:
        every rank calls it, in the same order as its other new_group calls)."""
        g = dist.new_group(
            list(range(dist.get_world_size())), timeout=datetime.timedelta(seconds=timeout_s)
        )
        return cls(dist.get_rank(), dist.get_world_size(), g.group_name, g)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks; in place when x is contiguous (returns the result)."""
        if self.size == 1:
            return x
        if self.custom_ar is not None:
            out = self.custom_ar.maybe_all_reduce(x)
            if out is not None:
                return out
        if not x.is_contiguous():
            x = x.contiguous()
        return comm_ops.all_reduce(x, self.group_name)

    def all_gather(self, x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        """The ranks' x concatenated along the last dim. sizes: each rank's last-dim size when
        they differ (x is padded to the largest for the collective, and trimmed after)."""
        if self.size == 1:
            return x
        width = x.shape[-1]
        top = max(sizes) if sizes else width
        if width < top:
            x = torch.nn.functional.pad(x, (0, top - width))
        lead = x.shape[:-1]
        flat = x.reshape(-1, top).contiguous()
        out = comm_ops.all_gather(flat, self.group_name, self.size)  # [size * rows, top]
        parts = out.view(self.size, flat.shape[0], top)
        if sizes and any(s != top for s in sizes):
            pieces = [parts[r, :, : sizes[r]] for r in range(self.size)]
        else:
            pieces = list(parts.unbind(0))
        return torch.cat(pieces, dim=-1).view(*lead, -1)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.size == 1:
            return x
        return comm_ops.broadcast(x, src, self.group_name)
