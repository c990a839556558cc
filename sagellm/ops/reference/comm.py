"""References for the collectives: torch.distributed's own all_reduce / all_gather_into_tensor /
broadcast on the same group, returning new tensors (the inputs are left untouched)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _group(group_name: str) -> dist.ProcessGroup:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def all_reduce(tensor: torch.Tensor, group_name: str) -> torch.Tensor:
    """The sum over ranks of tensor [...]."""
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=_group(group_name))
    return out


def all_gather(input: torch.Tensor, group_name: str) -> torch.Tensor:
    """[world * n, ...]: every rank's input [n, ...] in rank order."""
    g = _group(group_name)
    out = input.new_empty((g.size() * input.shape[0], *input.shape[1:]))
    dist.all_gather_into_tensor(out, input.contiguous(), group=g)
    return out


def broadcast(tensor: torch.Tensor, src: int, group_name: str) -> torch.Tensor:
    """Rank src's tensor (src: a rank within the group)."""
    out = tensor.clone()
    dist.broadcast(out, group_src=src, group=_group(group_name))
    return out
