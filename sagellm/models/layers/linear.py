"""Linear layers whose weights are held by a per-layer weight method.

A layer never touches its weight tensors directly: a `WeightMethod` creates them, loads
checkpoint tensors into them (including the shards of fused projections such as qkv or
gate_up), and applies the product. Two methods: `DenseWeights` (a tensor in the model dtype) and
`GGUFWeights` (the GGUF file's blocks, multiplied by the native gguf_linear kernel). A layer
takes the method its checkpoint tensors call for (CausalLM.load_weights switches a layer to
GGUFWeights when it is given a GGUFWeight), so model code never names one.

`Embedding` is a Linear read by rows: the token table, which a tied LM head multiplies with.

Tensor parallelism (a `TPGroup` given to the layer): a column-parallel Linear holds a contiguous
range of each shard's output rows (`row_slices`; the q, k, v or gate, up rows of its own heads
or intermediate columns) and, for an LM head, all-gathers its outputs; a row-parallel Linear
holds a range of input columns (`col_slice`) and all-reduces its partial products, its bias
added by rank 0 only. An exact row-parallel layer (`input_sizes`) holds a range of output rows
instead, all-gathers its input, multiplies over the whole K and all-gathers its outputs: every
output element is then the same dot product as on one process, which keeps quantized-activation
kernels (GGUF's int8 activation blocks amplify summation-order differences) bit-identical. A
layer narrows each checkpoint tensor to its slice before anything is copied (`narrow_weight`); a
`LazyWeight` (sagellm.models.sharded_checkpoint) reads only that slice from the file.
`VocabParallelEmbedding` holds a range of the vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from sagellm.models.gguf_loader import GGUFWeight
from sagellm.models.layers.direct_call import DirectCall
from sagellm.models.sharded_checkpoint import LazyWeight, narrow_gguf
from sagellm.ops import linear as linear_ops
from sagellm.ops import quant as quant_ops

if TYPE_CHECKING:
    from sagellm.distributed.group import TPGroup


class WeightMethod:
    """How a Linear stores and multiplies its weight."""

    name = "abstract"

    def create(self, layer: Linear) -> None:
        raise NotImplementedError

    def load(self, layer: Linear, shard: str | None, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, layer: Linear) -> None:
        """Called once every shard is loaded."""

    def rows(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        """W[ids] in the layer dtype: [*ids.shape, in_features] (an embedding lookup)."""
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
        # A shape without storage until the first tensor is loaded: a layer that ends up with
        # another method (GGUF blocks) never holds a dense copy, not even briefly (untouched
        # pages would still be reused heap, resident, after the loader's temporaries).
        layer.weight = nn.Parameter(
            torch.empty(layer.out_features, layer.in_features, dtype=layer.dtype, device="meta"),
            requires_grad=False,
        )

    def load(self, layer: Linear, shard: str | None, weight: torch.Tensor) -> None:
        start, size = layer.shard_range(shard)
        expected = (size, layer.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"weight for {layer.describe(shard)} has shape {tuple(weight.shape)}, "
                f"expected {expected}"
            )
        if layer.weight.is_meta:
            layer.weight = nn.Parameter(
                torch.empty(layer.weight.shape, dtype=layer.dtype, device=layer.device),
                requires_grad=False,
            )
        layer.weight.data[start : start + size].copy_(weight)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return dense_matmul(x, layer.weight, layer.bias)

    def rows(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)


def gguf_native_types(device: torch.device | str) -> frozenset[int]:
    """GGML type ids whose weights can stay in their block format on `device`: those the
    gguf_linear op has a kernel for there (none when the extension lacks the op)."""
    key = torch.device(device).type.upper()
    if not hasattr(torch.ops.sagellm, "gguf_linear") or not (
        torch._C._dispatch_has_kernel_for_dispatch_key("sagellm::gguf_linear", key)
    ):
        return frozenset()
    return frozenset(quant_ops.GGUF_BLOCKS)


class GGUFWeights(WeightMethod):
    """The GGUF file's blocks, uint8 [rows, row_bytes], multiplied by gguf_linear (activations
    rounded to int8 blocks on the fly, weights never expanded).

    Shards of a fused projection that share a type are concatenated into one tensor, so qkv or
    gate_up is one kernel call; where they differ (Gemma 3 stores q and k as Q5_0 and v as Q8_0)
    each run of equal types is a part that writes its own columns of the output. A shard the file
    stores as F32/F16 (rare) is a dense part in the layer dtype.
    """

    name = "gguf"

    def create(self, layer: Linear) -> None:
        layer.weight = None
        self._loaded: dict[str | None, GGUFWeight | torch.Tensor] = {}
        # (first output column, columns, qtype or None for a dense part, the tensor)
        self.parts: list[tuple[int, int, int | None, torch.Tensor]] = []
        # The one quantized part of most layers, with the bias and the op, bound once: a decode
        # step calls apply ~120 times, so attribute lookups through nn.Module add up.
        self._single: tuple | None = None

    def load(self, layer: Linear, shard: str | None, weight) -> None:
        start, size = layer.shard_range(shard)
        expected = (size, layer.in_features)
        if isinstance(weight, GGUFWeight):
            if weight.transposed:
                raise ValueError(
                    f"weight for {layer.describe(shard)} is a transposed GGUF tensor; its blocks "
                    "run along the other dimension, so it cannot be multiplied as (out, in)"
                )
            if weight.qtype not in quant_ops.GGUF_BLOCKS:
                raise ValueError(
                    f"weight for {layer.describe(shard)} has GGML type id {weight.qtype}, which "
                    f"gguf_linear has no kernel for (it has: {sorted(quant_ops.GGUF_BLOCKS)})"
                )
            if tuple(weight.shape) == expected:
                need = (size, quant_ops.gguf_row_bytes(weight.qtype, layer.in_features))
                if tuple(weight.data.shape) != need or weight.data.dtype != torch.uint8:
                    raise ValueError(
                        f"weight for {layer.describe(shard)} is {weight.data.dtype} "
                        f"{tuple(weight.data.shape)}; {weight.type_name} needs uint8 {need}"
                    )
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"weight for {layer.describe(shard)} has shape {tuple(weight.shape)}, "
                f"expected {expected}"
            )
        if shard in self._loaded:
            raise ValueError(f"weight for {layer.describe(shard)} is loaded twice")
        self._loaded[shard] = weight

    def finish(self, layer: Linear) -> None:
        order = list(layer._shards) or [None]
        missing = [s for s in order if s not in self._loaded]
        if missing:  # CausalLM.load_weights names what is missing; nothing to build yet
            return
        runs: list[list[str | None]] = []
        for shard in order:
            if runs and _qtype(self._loaded[runs[-1][-1]]) == _qtype(self._loaded[shard]):
                runs[-1].append(shard)
            else:
                runs.append([shard])
        for i, run in enumerate(runs):
            parts = [self._loaded[s] for s in run]
            qtype = _qtype(parts[0])
            if qtype is None:
                data = torch.cat([p.to(layer.dtype) for p in parts])
            else:
                data = torch.cat([p.data for p in parts]) if len(parts) > 1 else parts[0].data
            param = nn.Parameter(data.to(layer.device).contiguous(), requires_grad=False)
            layer.register_parameter("qweight" if len(runs) == 1 else f"qweight{i}", param)
            start = layer.shard_range(run[0])[0] if run[0] is not None else 0
            self.parts.append((start, data.shape[0], qtype, param))
        self._loaded.clear()
        if len(self.parts) == 1 and self.parts[0][2] is not None:
            _, _, qtype, w = self.parts[0]
            self._single = (torch.ops.sagellm.gguf_linear.default, w, qtype, layer.bias)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        flat = x.dim() == 2
        x2 = x if flat else x.reshape(-1, layer.in_features)
        if self._single is not None:
            op, w, qtype, bias = self._single
            out = x2.new_empty((x2.shape[0], w.shape[0]))
            op(out, x2, w, qtype, bias)
        else:
            out = self._apply_parts(layer, x2)
        return out if flat else out.view(*x.shape[:-1], layer.out_features)

    def _apply_parts(self, layer: Linear, x2: torch.Tensor) -> torch.Tensor:
        bias = layer.bias
        if len(self.parts) == 1:  # a whole layer stored F32/F16
            return dense_matmul(x2, self.parts[0][3], bias)
        out = x2.new_empty((x2.shape[0], layer.out_features))
        for start, size, qtype, w in self.parts:
            cols = out[:, start : start + size]
            b = None if bias is None else bias[start : start + size]
            if qtype is None:
                cols.copy_(dense_matmul(x2, w, b))
            else:
                quant_ops.gguf_linear(x2, w, qtype, b, out=cols)
        return out

    def rows(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        if len(self.parts) != 1:
            raise ValueError(f"{layer.layer_name}: a table in several parts cannot be looked up")
        _, _, qtype, w = self.parts[0]
        if qtype is None:
            return F.embedding(ids, w)
        # Only the looked-up rows are expanded, on the table's device: a step reads a few rows of
        # a table that, dense, would be 4-8x its file size (Gemma 3 270M: 262k x 640), and on a
        # GPU nothing goes through the host, so a decode step can be captured in a CUDA graph.
        picked = w.index_select(0, ids.reshape(-1))
        out = quant_ops.gguf_dequantize(picked, qtype, layer.dtype)
        return out.view(*ids.shape, layer.in_features)

    def describe(self) -> list[tuple[int | None, int]]:
        """(qtype or None for dense, rows) of each part, in output order."""
        return [(qtype, size) for _, size, qtype, _ in self.parts]


def _qtype(w: GGUFWeight | torch.Tensor) -> int | None:
    return w.qtype if isinstance(w, GGUFWeight) else None


def narrow_weight(weight, dim: int, start: int, size: int, what: str):
    """weight's [start, start + size) along dim (0: rows, 1: columns), reading no more of it
    than that when it is a LazyWeight. A GGUF weight split between columns stays in its block
    format when the split falls on block boundaries, else that slice is dequantized (logged)."""
    if isinstance(weight, LazyWeight):
        return weight.narrow(dim, start, size, what)
    if isinstance(weight, GGUFWeight):
        return narrow_gguf(weight, dim, start, size, what)
    return weight.narrow(dim, start, size)


class Linear(DirectCall, nn.Module):
    """y = x W^T + b, with W [out_features, in_features].

    `shards` names the output slices of a fused projection, e.g. [("q", 576), ("k", 192),
    ("v", 192)] for qkv; checkpoint tensors are loaded per shard.

    Tensor parallelism (`tp`): `row_slices` maps each shard (None for an unfused layer) to the
    (start, size) of the checkpoint's rows this rank holds (column-parallel; sizes equal the
    shard sizes); `gather_sizes` (the outputs each rank holds) makes a column-parallel layer
    all-gather its outputs. `col_slice` is the (start, size) of the checkpoint's input
    columns this rank holds (row-parallel, size == in_features): outputs are all-reduced.
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
        tp: TPGroup | None = None,
        row_slices: dict[str | None, tuple[int, int]] | None = None,
        col_slice: tuple[int, int] | None = None,
        gather_sizes: list[int] | None = None,
        input_sizes: list[int] | None = None,
    ):
        super().__init__()
        if row_slices and col_slice:
            raise ValueError(f"{name}: a layer splits either its rows or its columns, not both")
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
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.row_slices = dict(row_slices or {}) if self.tp else {}
        self.col_slice = col_slice if self.tp else None
        self.gather_sizes = gather_sizes if self.tp else None
        self.input_sizes = input_sizes if self.tp else None
        if self.col_slice is not None and self.col_slice[1] != in_features:
            raise ValueError(
                f"{name}: col_slice {self.col_slice} does not hold {in_features} columns"
            )
        # A row-parallel layer's bias is added by rank 0 alone, so the all-reduce adds it once.
        self._drop_bias = bool(bias and self.col_slice is not None and self.tp.rank != 0)
        self.method = method or DenseWeights()
        self.method.create(self)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias and not self._drop_bias
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

    def use_method(self, method: WeightMethod) -> None:
        """Store the weight with `method` instead (before any of it is loaded)."""
        if self.method.name == method.name:
            return
        if "weight" in self._parameters:
            del self._parameters["weight"]
        self.method = method
        method.create(self)

    def _local(self, tensor, shard: str | None, is_bias: bool):
        """The part of a checkpoint tensor this rank holds."""
        if shard in self.row_slices:
            start, size = self.row_slices[shard]
            return narrow_weight(tensor, 0, start, size, self.describe(shard))
        if self.col_slice is not None and not is_bias:
            start, size = self.col_slice
            return narrow_weight(tensor, 1, start, size, self.describe(shard))
        if isinstance(tensor, LazyWeight):
            return tensor.load()
        return tensor

    def load_weight(self, weight, shard: str | None = None) -> None:
        """Load a checkpoint tensor (GGUFWeight, LazyWeight) into the whole layer or one shard;
        under tensor parallelism only this rank's slice of it."""
        self.method.load(self, shard, self._local(weight, shard, is_bias=False))

    def finish_loading(self) -> None:
        self.method.finish(self)

    def load_bias(self, bias: torch.Tensor, shard: str | None = None) -> None:
        if self._drop_bias:
            return
        bias = self._local(bias, shard, is_bias=True)
        if isinstance(bias, GGUFWeight):
            bias = bias.dequantize(self.dtype)
        if self.bias is None:
            raise ValueError(f"{self.describe(shard)} has no bias, but the checkpoint has one")
        start, size = self.shard_range(shard)
        if tuple(bias.shape) != (size,):
            raise ValueError(
                f"bias for {self.describe(shard)} has shape {tuple(bias.shape)}, expected ({size},)"
            )
        self.bias.data[start : start + size].copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x)
        if self.tp is None:
            return y
        if self.col_slice is not None:
            return self.tp.all_reduce(y)
        if self.gather_sizes is not None:
            return self.tp.all_gather(y, self.gather_sizes)
        return y

    def forward_gathered(self, x: torch.Tensor) -> torch.Tensor:
        """Exact row-parallel: x holds this rank's input columns; every rank's are gathered."""
        return self.forward(self.tp.all_gather(x, self.input_sizes))


class Embedding(Linear):
    """A [num, dim] table read by rows (`forward(ids)`: [*ids.shape, dim]); a tied LM head
    multiplies with the same table (`unembed(x)`: x @ table.T). Stored by a weight method like any
    Linear, so a GGUF table stays quantized and the head runs gguf_linear on it."""

    def __init__(self, num: int, dim: int, *, dtype, device, name: str = ""):
        super().__init__(dim, num, dtype=dtype, device=device, name=name)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.method.rows(self, ids)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)


class VocabParallelEmbedding(Embedding):
    """An Embedding whose rank holds the rows [start, start + size) of the vocabulary.

    Lookup: each rank writes the rows of the ids it holds and zeros elsewhere; an all-reduce sums
    them into every rank's full result. A tied LM head (`unembed`) gathers every rank's logits.
    """

    def __init__(self, num: int, dim: int, *, tp: TPGroup, dtype, device, name: str = ""):
        from sagellm.distributed.sharding import split_range

        self.sizes = [split_range(num, tp.size, r)[1] for r in range(tp.size)]
        self.start, size = split_range(num, tp.size, tp.rank)
        self.vocab_size = num
        super().__init__(size, dim, dtype=dtype, device=device, name=name)
        self.tp = tp
        self.row_slices = {None: (self.start, size)}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.out_features)
        rows = self.method.rows(self, local.masked_fill(outside, 0))
        rows = rows.masked_fill(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(rows)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather(self.method.apply(self, x), self.sizes)
