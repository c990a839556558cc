"""Collectives: typed wrappers over torch.ops.sagellm's all_reduce / all_gather / broadcast, and
their fake kernels.

The ops go through a torch.distributed process group named by its `group_name` (c10d resolves the
same group object in C++): gloo for CPU tensors, NCCL for CUDA ones, with the group's timeout.
Tensors must be contiguous; dtypes fp32, fp16, bf16, int32, int64; the reduction is a sum.
"""

from __future__ import annotations

import torch

import sagellm  # noqa: F401  (loads the extension that registers torch.ops.sagellm)


def group_size(group_name: str) -> int:
    """Ranks in the torch.distributed group named group_name."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name).size()


def all_reduce(tensor: torch.Tensor, group_name: str) -> torch.Tensor:
    """In place: tensor = the sum of every rank's tensor.

    tensor: [...] contiguous, fp32/fp16/bf16/int32/int64, the same shape on every rank.
    group_name: a torch.distributed group's group_name.
    Returns tensor.
    """
    torch.ops.sagellm.all_reduce(tensor, group_name)
    return tensor


def all_gather(
    input: torch.Tensor,
    group_name: str,
    world_size: int | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = every rank's input, in rank order, concatenated along dim 0.

    input: [n, ...] contiguous, the same shape on every rank.
    world_size: ranks in the group (looked up when None).
    out: [world_size * n, ...], input's dtype and device (allocated when None).
    Returns out.
    """
    if out is None:
        ws = world_size or group_size(group_name)
        out = input.new_empty((ws * input.shape[0], *input.shape[1:]))
    torch.ops.sagellm.all_gather(out, input, group_name)
    return out


def broadcast(tensor: torch.Tensor, src: int, group_name: str) -> torch.Tensor:
    """In place: tensor = rank src's tensor (src: a rank within the group).

    tensor: [...] contiguous, the same shape and dtype on every rank.
    Returns tensor.
    """
    torch.ops.sagellm.broadcast(tensor, src, group_name)
    return tensor


@torch.library.register_fake("sagellm::all_reduce")
def _all_reduce_fake(tensor, group_name) -> None:
    return None


@torch.library.register_fake("sagellm::all_gather")
def _all_gather_fake(out, input, group_name) -> None:
    torch._check(input.dim() >= 1, lambda: "all_gather: input must have at least one dimension")
    torch._check(
        out.dim() == input.dim() and out.shape[1:] == input.shape[1:],
        lambda: f"all_gather: out has shape {tuple(out.shape)} for input {tuple(input.shape)}",
    )


@torch.library.register_fake("sagellm::broadcast")
def _broadcast_fake(tensor, src, group_name) -> None:
    return None
