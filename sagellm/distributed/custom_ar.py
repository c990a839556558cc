"""The custom CUDA all-reduce for small messages, and when a TP group uses it.

torch.classes.sagellm.CustomAllReduce (csrc/comm/cuda/custom_all_reduce.cu) sums over peer
buffers opened with CUDA IPC: one-shot (every rank reads every peer) up to ONE_SHOT_MAX_BYTES,
two-shot (reduce-scatter + all-gather) up to MAX_BYTES; NCCL takes everything else. It is set
up when the build has it, the group has 2, 4 or 8 ranks on one host and every pair of their GPUs
has peer access (or shares one GPU); SAGELLM_CUSTOM_AR=0 turns it off. Its launches take fixed
kernel parameters and keep their barrier counters on the device, so CUDA graphs can capture them.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

ONE_SHOT_MAX_BYTES = 256 * 1024
MAX_BYTES = 8 * 2**20
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available() -> bool:
    """Whether this build of sagellm._C has the custom all-reduce (CUDA builds only)."""
    import sagellm  # noqa: F401  (registers torch.classes.sagellm)

    try:
        torch.classes.sagellm.CustomAllReduce  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


class CustomAllReduce:
    """One rank's custom all-reduce. `maybe_all_reduce(x)` sums x in place over the ranks and
    returns it, or returns None for a tensor it does not take (the caller uses NCCL then); the
    choice depends only on x's size, dtype and layout, so every rank makes the same one."""

    def __init__(
        self,
        rank: int,
        world: int,
        device: torch.device,
        exchange_group: dist.ProcessGroup | None = None,
        max_bytes: int = MAX_BYTES,
        one_shot_max_bytes: int = ONE_SHOT_MAX_BYTES,
    ):
        with torch.cuda.device(device):
            self._ar = torch.classes.sagellm.CustomAllReduce(rank, world, max_bytes)
            mine = bytes(self._ar.ipc_handle().numpy())
            handles: list = [None] * world
            dist.all_gather_object(handles, mine, group=exchange_group)
            table = torch.stack(
                [torch.frombuffer(bytearray(h), dtype=torch.uint8) for h in handles]
            )
            self._ar.open(table)
        self.max_bytes, self.one_shot_max_bytes = max_bytes, one_shot_max_bytes

    def takes(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return (
            x.is_cuda
            and x.dtype in _DTYPES
            and x.is_contiguous()
            and 0 < nbytes <= self.max_bytes
            and nbytes % 16 == 0
            and x.data_ptr() % 16 == 0
        )

    def all_reduce(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """out (default: x itself) = the sum over ranks of x (x must be `takes`-able)."""
        out = x if out is None else out
        nbytes = x.numel() * x.element_size()
        self._ar.all_reduce(out, x, nbytes <= self.one_shot_max_bytes)
        return out

    def maybe_all_reduce(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.all_reduce(x) if self.takes(x) else None


def peer_access_everywhere(devices: list[int]) -> bool:
    """Whether every pair of these local GPUs can read each other's memory (same GPU: yes)."""
    for a in devices:
        for b in devices:
            if a != b and not torch.cuda.can_device_access_peer(a, b):
                return False
    return True


def maybe_custom_all_reduce(tp, device: torch.device, exchange_group=None):
    """A CustomAllReduce for the TP group, or None where it cannot or should not run.
    Collective over exchange_group (default: the TP group): every rank calls it."""
    if os.environ.get("SAGELLM_CUSTOM_AR", "1") == "0" or tp.size not in (2, 4, 8):
        return None
    group = exchange_group if exchange_group is not None else tp.group
    # Every rank must decide alike: gather each rank's view (build, host, device).
    mine = (available(), os.uname().nodename, torch.device(device).index)
    views: list = [None] * tp.size
    dist.all_gather_object(views, mine, group=group)
    if not all(v[0] for v in views) or len({v[1] for v in views}) != 1:
        return None
    if not peer_access_everywhere([v[2] for v in views]):
        return None
    return CustomAllReduce(tp.rank, tp.size, torch.device(device), group)
