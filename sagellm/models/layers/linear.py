"""Linear layers whose weights are held by a per-layer weight method.

A layer never touches its weight tensors directly: a `WeightMethod` creates them, loads
checkpoint tensors into them (including the shards of fused projections such as qkv or
gate_up), and applies the product. Dense storage is the method today; the quantization issue adds
methods that keep GGUF blocks or int8/int4/fp8 weights with native GEMMs, without touching the
model code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sagellm.ops import linear as linear_ops


class WeightMethod:
    """How a Linear stores and multiplies its weight."""

    name = "abstract"

    def create(self, layer: Linear) -> None:
        raise NotImplementedError

    def load(self, layer: Linear, shard: str | None, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# Largest batch (rows of x) for which the native GEMV beats torch's GEMM on the CPU, per dtype
# (benchmarks/ops/bench_linear.py: MKL's sgemv streams weights at ~10 GB/s on one core; ours
# reaches copy bandwidth on all cores; bf16 becomes compute-bound past a few rows).
_NATIVE_MAX_ROWS = {torch.float32: 16, torch.bfloat16: 4}


def dense_matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ weight.T + bias: the native small-batch GEMV on the CPU where it wins, else torch."""
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if x.device.type == "cpu" and 0 < rows <= _NATIVE_MAX_ROWS.get(weight.dtype, 0):
        out = linear_ops.dense_linear(x.reshape(rows, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class DenseWeights(WeightMethod):
    """An (out, in) tensor in the model dtype; small batches on the CPU use the native GEMV
    (sagellm.ops.linear), the rest torch's GEMM (MKL/oneDNN/cuBLAS)."""

    name = "dense"

    def create(self, layer: Linear) -> None:
        layer.weight = nn.Parameter(
            torch.empty(
                layer.out_features, layer.in_features, dtype=layer.dtype, device=layer.device
            ),
            requires_grad=False,
        )

    def load(self, layer: Linear, shard: str | None, weight: torch.Tensor) -> None:
        start, size = layer.shard_range(shard)
        expected = (size, layer.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"weight for {layer.describe(shard)} has shape {tuple(weight.shape)}, expected {expected}"
            )
        layer.weight.data[start : start + size].copy_(weight)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return dense_matmul(x, layer.weight, layer.bias)


class Linear(nn.Module):
    """y = x W^T + b, with W [out_features, in_features].

    `shards` names the output slices of a fused projection, e.g. [("q", 576), ("k", 192),
    ("v", 192)] for qkv; checkpoint tensors are loaded per shard.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int | None = None,
        *,
        bias: bool = False,
        shards: list[tuple[str, int]] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        method: WeightMethod | None = None,
        name: str = "",
    ):
        super().__init__()
        if shards:
            total = sum(size for _, size in shards)
            if out_features is not None and out_features != total:
                raise ValueError(f"{name}: out_features {out_features} != sum of shards {total}")
            out_features = total
        assert out_features is not None
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.device, self.layer_name = dtype, torch.device(device), name
        self._shards: dict[str, tuple[int, int]] = {}
        offset = 0
        for shard, size in shards or []:
            self._shards[shard] = (offset, size)
            offset += size
        self.method = method or DenseWeights()
        self.method.create(self)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    def shard_range(self, shard: str | None) -> tuple[int, int]:
        if shard is None:
            if self._shards:
                raise ValueError(f"{self.layer_name} is fused: name the shard to load")
            return 0, self.out_features
        if shard not in self._shards:
            raise ValueError(f"{self.layer_name} has no shard {shard!r}")
        return self._shards[shard]

    def describe(self, shard: str | None) -> str:
        return f"{self.layer_name}[{shard}]" if shard else self.layer_name

    def load_weight(self, weight: torch.Tensor, shard: str | None = None) -> None:
        self.method.load(self, shard, weight)

    def load_bias(self, bias: torch.Tensor, shard: str | None = None) -> None:
        if self.bias is None:
            raise ValueError(f"{self.describe(shard)} has no bias, but the checkpoint has one")
        start, size = self.shard_range(shard)
        if tuple(bias.shape) != (size,):
            raise ValueError(
                f"bias for {self.describe(shard)} has shape {tuple(bias.shape)}, expected ({size},)"
            )
        self.bias.data[start : start + size].copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)


def empty_embedding(num: int, dim: int, dtype: torch.dtype, device) -> nn.Embedding:
    """An embedding table left uninitialised (the checkpoint fills it; random init of a 262k
    vocabulary would cost seconds)."""
    w = torch.empty(num, dim, dtype=dtype, device=device)
    return nn.Embedding(num, dim, _weight=w, _freeze=True)
