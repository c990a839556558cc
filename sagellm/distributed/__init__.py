"""Tensor parallelism: process groups (gloo / NCCL under torch.distributed), how a model is split
across ranks, and the custom CUDA all-reduce for small messages.

The engine's multi-process executor (sagellm.runtime.tp_executor) builds on this package; model
layers take a `TPGroup` (sagellm.distributed.group) and split themselves by `sharding`.
"""

from sagellm.distributed.group import TPGroup, init_distributed
from sagellm.distributed.sharding import HeadSplit, split_heads, split_range

__all__ = ["HeadSplit", "TPGroup", "init_distributed", "split_heads", "split_range"]
