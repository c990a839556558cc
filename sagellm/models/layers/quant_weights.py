"""Weight methods that keep a Linear's weight quantized: int8, int4 and fp8.

Two sources, one set of methods:
- a dense checkpoint quantized at load (`EngineConfig.quantization` int8 | int4 | fp8, like
  vLLM's `--quantization fp8`): each shard of a fused projection (q/k/v, gate/up) is quantized
  as it arrives. Every scale belongs to one output row (int8 and fp8 per channel, int4 per
  group of G input columns of a row), so shards quantized apart concatenate into the layer.
- an AWQ or GPTQ 4-bit checkpoint (config.json `quantization_config`): its qweight / qzeros /
  scales (/ g_idx) come in as `CheckpointTensor`s and are repacked, exactly, into int4_linear's
  layout when the layer finishes loading (layers/int4_formats.py has the formats).

`apply_quantization` switches the eligible layers before any weight is loaded. The token
embedding and the LM head stay dense: the embedding is read one row per token (nothing to gain),
and the head sets every logit, where a 4-bit error is seen directly in the sampled distribution
(AWQ and GPTQ checkpoints store it dense too).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sagellm.models.errors import CorruptCheckpointError, UnsupportedModelError
from sagellm.models.layers.int4_formats import CheckpointQuant, parse_quant_config, repack
from sagellm.models.layers.linear import Embedding, Linear, WeightMethod, dense_matmul
from sagellm.ops import quant as quant_ops
from sagellm.ops.quant import INT4_GROUP_SIZES

QUANTIZATIONS = ("int8", "int4", "fp8")
CHECKPOINT_LEAVES = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class CheckpointTensor:
    """One tensor of a pre-quantized Linear (`kind`: qweight, qzeros, scales or g_idx), as
    CausalLM.load_weights hands it to Linear.load_weight."""

    kind: str
    data: torch.Tensor


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=False)


def _flat(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    x2 = x if x.dim() == 2 else x.reshape(-1, layer.in_features)
    return x2.contiguous()


class _QuantizedRows(WeightMethod):
    """Shared plumbing: a dense shard arrives, is checked, quantized on the layer's device and
    written into its rows of the packed tensors (allocated on the first shard)."""

    def create(self, layer: Linear) -> None:
        layer.weight = None
        self._seen: set[str | None] = set()
        # The tensors apply passes to the op, bound once loading is done: a decode step calls
        # apply ~120 times and nn.Module attribute lookups add up (as in GGUFWeights).
        self._bound: tuple | None = None

    def finish(self, layer: Linear) -> None:
        if "qweight" in layer._parameters:
            self._bound = self._bind(layer)

    def _bind(self, layer: Linear) -> tuple:
        raise NotImplementedError

    def _dense_shard(self, layer: Linear, shard: str | None, weight) -> tuple[int, torch.Tensor]:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise ValueError(
                f"weight for {layer.describe(shard)} is {type(weight).__name__}"
                f"{' ' + str(weight.dtype) if isinstance(weight, torch.Tensor) else ''}; "
                f"{self.name} quantizes dense floating-point weights"
            )
        start, size = layer.shard_range(shard)
        if tuple(weight.shape) != (size, layer.in_features):
            raise ValueError(
                f"weight for {layer.describe(shard)} has shape {tuple(weight.shape)}, "
                f"expected {(size, layer.in_features)}"
            )
        if shard in self._seen:
            raise ValueError(f"weight for {layer.describe(shard)} is loaded twice")
        self._seen.add(shard)
        return start, weight.to(layer.device)

    def _buffer(self, layer: Linear, name: str, shape, dtype) -> torch.Tensor:
        if name not in layer._parameters:
            layer.register_parameter(
                name, _param(torch.empty(shape, dtype=dtype, device=layer.device))
            )
        return layer._parameters[name].data


class Int8Weights(_QuantizedRows):
    """W8A16: int8 [N, K] with one fp32 scale per output row (symmetric, per channel),
    multiplied by int8_linear without expanding the weight."""

    name = "int8"

    def load(self, layer: Linear, shard: str | None, weight) -> None:
        start, w = self._dense_shard(layer, shard, weight)
        q, s = quant_ops.quantize_int8(w)
        n, k = layer.out_features, layer.in_features
        self._buffer(layer, "qweight", (n, k), torch.int8)[start : start + len(q)].copy_(q)
        self._buffer(layer, "scales", (n,), torch.float32)[start : start + len(q)].copy_(s)

    def _bind(self, layer: Linear) -> tuple:
        # The op overload bound once: apply runs ~100 times per decode step.
        return (torch.ops.sagellm.int8_linear.default, layer.qweight, layer.scales, layer.bias)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        op, q, s, bias = self._bound or self._bind(layer)
        x2 = _flat(layer, x)
        out = x2.new_empty((x2.shape[0], q.shape[0]))
        op(out, x2, q, s, bias)
        return out.view(*x.shape[:-1], q.shape[0])

    def dequantized(self, layer: Linear) -> torch.Tensor:
        """W as fp32 [N, K]: what the kernel multiplies by."""
        return layer.qweight.float() * layer.scales[:, None]

    def kernel(self, layer: Linear) -> str:
        return f"int8_linear ({layer.device.type})"


def int4_group_size(k: int, preferred: int) -> int:
    """The largest of 128 / 64 / 32 not above `preferred` that divides k (SmolLM2's hidden size
    576 takes groups of 64); ValueError when none does."""
    for g in sorted(INT4_GROUP_SIZES, reverse=True):
        if g <= preferred and k % g == 0:
            return g
    raise ValueError(
        f"in_features = {k} is not a multiple of any int4 group size <= {preferred} "
        f"({', '.join(map(str, INT4_GROUP_SIZES))})"
    )


class Int4Weights(_QuantizedRows):
    """W4A16: uint8 [N, K / 2] (two values per byte), fp32 scales [N, K / G], zeros uint8
    [N, K / G] or None for 8 (symmetric), multiplied by int4_linear.

    group_size: the preferred G (128); a layer whose K it does not divide takes the largest of
    64 / 32 that does. zero_point: asymmetric groups (min/max mapped to 0..15). checkpoint: the
    AWQ / GPTQ format when the weights come pre-quantized; a layer such a checkpoint stores
    dense (its modules_to_not_convert) stays dense.
    """

    name = "int4"

    def __init__(
        self,
        group_size: int = 128,
        zero_point: bool = False,
        checkpoint: CheckpointQuant | None = None,
    ):
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(
                f"group_size = {group_size!r} is invalid: expected one of {INT4_GROUP_SIZES}"
            )
        self.preferred = checkpoint.group_size if checkpoint else group_size
        self.zero_point, self.checkpoint = zero_point, checkpoint
        if checkpoint is not None:
            self.name = checkpoint.method

    def create(self, layer: Linear) -> None:
        super().create(layer)
        self.group_size = int4_group_size(layer.in_features, self.preferred)
        if self.checkpoint is not None and self.group_size != self.checkpoint.group_size:
            raise ValueError(
                f"{layer.layer_name}: in_features {layer.in_features} is not a multiple of the "
                f"checkpoint's group size {self.checkpoint.group_size}"
            )
        self.zeros: torch.Tensor | None = None
        self._parts: dict[str | None, dict[str, torch.Tensor]] = {}
        self._dense: dict[str | None, torch.Tensor] = {}

    def load(self, layer: Linear, shard: str | None, weight) -> None:
        if self.checkpoint is not None:
            self._collect(layer, shard, weight)
            return
        start, w = self._dense_shard(layer, shard, weight)
        q, s, z = quant_ops.quantize_int4(w, self.group_size, self.zero_point)
        n, k, groups = layer.out_features, layer.in_features, layer.in_features // self.group_size
        rows = slice(start, start + q.shape[0])
        self._buffer(layer, "qweight", (n, k // 2), torch.uint8)[rows].copy_(q)
        self._buffer(layer, "scales", (n, groups), torch.float32)[rows].copy_(s)
        if z is not None:
            self._buffer(layer, "qzeros", (n, groups), torch.uint8)[rows].copy_(z)
            self.zeros = layer.qzeros

    def _collect(self, layer: Linear, shard: str | None, weight) -> None:
        layer.shard_range(shard)  # names the layer when the shard is unknown
        if isinstance(weight, CheckpointTensor):
            parts = self._parts.setdefault(shard, {})
            if weight.kind in parts:
                raise ValueError(f"{weight.kind} for {layer.describe(shard)} is loaded twice")
            parts[weight.kind] = weight.data
        else:
            if shard in self._dense:
                raise ValueError(f"weight for {layer.describe(shard)} is loaded twice")
            self._dense[shard] = weight

    def finish(self, layer: Linear) -> None:
        if self.checkpoint is not None and (self._parts or self._dense):
            self._build(layer)
        super().finish(layer)

    def _build(self, layer: Linear) -> None:
        order = list(layer._shards) or [None]
        if any(s not in self._parts and s not in self._dense for s in order):
            return  # CausalLM.load_weights names the missing weights
        if self._dense and self._parts:
            raise CorruptCheckpointError(
                f"{layer.layer_name}: the checkpoint stores some shards quantized "
                f"({', '.join(map(str, self._parts))}) and some dense "
                f"({', '.join(map(str, self._dense))})"
            )
        if self._dense:  # a module the checkpoint left unquantized
            w = torch.cat([self._dense[s].to(layer.dtype) for s in order]).to(layer.device)
            layer.__dict__.pop("weight", None)  # the None create() set
            layer.register_parameter("weight", _param(w))
            self._dense.clear()
            return
        built = [
            repack(
                self.checkpoint,
                {k: v.to(layer.device) for k, v in self._parts[s].items()},
                layer.shard_range(s)[1],
                layer.in_features,
                layer.describe(s),
            )
            for s in order
        ]
        self._parts.clear()
        layer.register_parameter("qweight", _param(torch.cat([b.weight for b in built])))
        layer.register_parameter("scales", _param(torch.cat([b.scales for b in built])))
        zeros = torch.cat([b.zeros for b in built])
        if not bool((zeros == 8).all()):  # symmetric checkpoints need no zeros tensor
            layer.register_parameter("qzeros", _param(zeros))
            self.zeros = layer.qzeros

    def _bind(self, layer: Linear) -> tuple:
        op = torch.ops.sagellm.int4_linear.default
        return (op, layer.qweight, layer.scales, self.zeros, self.group_size, layer.bias)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if layer.weight is not None:
            return dense_matmul(x, layer.weight, layer.bias)
        op, q, s, z, g, bias = self._bound or self._bind(layer)
        x2 = _flat(layer, x)
        out = x2.new_empty((x2.shape[0], q.shape[0]))
        op(out, x2, q, s, z, g, bias)
        return out.view(*x.shape[:-1], q.shape[0])

    def dequantized(self, layer: Linear) -> torch.Tensor:
        """W as fp32 [N, K]: what the kernel multiplies by."""
        if layer.weight is not None:
            return layer.weight.float()
        q = quant_ops.unpack_int4(layer.qweight)
        z = self.zeros.float() if self.zeros is not None else torch.full_like(layer.scales, 8.0)
        g = self.group_size
        return (q.float() - z.repeat_interleave(g, 1)) * layer.scales.repeat_interleave(g, 1)

    def kernel(self, layer: Linear) -> str:
        if layer.weight is not None:
            return f"dense {str(layer.dtype).removeprefix('torch.')}"
        zp = "zero points" if self.zeros is not None else "symmetric"
        return f"int4_linear g{self.group_size} {zp} ({layer.device.type})"


class Fp8Weights(_QuantizedRows):
    """W8A8 fp8: float8_e4m3fn [N, K] with a fp32 scale per output row; activations are
    quantized per token on the fly and multiplied by torch._scaled_mm (CUDA only)."""

    name = "fp8"

    def create(self, layer: Linear) -> None:
        if layer.device.type != "cuda":
            raise ValueError(
                f"{layer.layer_name}: fp8 weights run through torch._scaled_mm, which needs a "
                f"CUDA device (this layer is on {layer.device})"
            )
        if layer.in_features % 16 or layer.out_features % 16:
            raise ValueError(
                f"{layer.layer_name}: torch._scaled_mm needs in_features {layer.in_features} and "
                f"out_features {layer.out_features} to be multiples of 16 for fp8"
            )
        super().create(layer)

    def load(self, layer: Linear, shard: str | None, weight) -> None:
        start, w = self._dense_shard(layer, shard, weight)
        w8, s = quant_ops.quantize_fp8_weight(w)
        rows = slice(start, start + w8.shape[0])
        n, k = layer.out_features, layer.in_features
        self._buffer(layer, "qweight", (n, k), torch.float8_e4m3fn)[rows].copy_(w8)
        # A per-tensor scale becomes the shard's rows' scale, so shards still concatenate.
        s = s.reshape(-1).float()
        self._buffer(layer, "scales", (n,), torch.float32)[rows].copy_(s.expand(w8.shape[0]))

    def _bind(self, layer: Linear) -> tuple:
        # fp8_linear's operands prepared once (its checks held at load): the weight transposed
        # for _scaled_mm and the scales as the [1, N] row it takes, not rebuilt on every call.
        scale_row = layer.scales.reshape(1, -1).contiguous()
        return (layer.qweight.t(), scale_row, layer.bias, layer.qweight.shape[0])

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        w_t, s_row, bias, n = self._bound or self._bind(layer)
        out = quant_ops.fp8_linear_prepared(_flat(layer, x), w_t, s_row, bias)
        return out.view(*x.shape[:-1], n)

    def dequantized(self, layer: Linear) -> torch.Tensor:
        return layer.qweight.float() * layer.scales[:, None]

    def kernel(self, layer: Linear) -> str:
        return "fp8_linear (torch._scaled_mm)"


def make_method(name: str) -> WeightMethod:
    """A fresh method for one layer: "int8", "int4" or "fp8".

    int4 is groups of 128 with zero points: on SmolLM2 (bench quality) asymmetric groups cost
    half the perplexity of symmetric ones (+29% vs +61% at g128), for one byte per 128 weights.
    """
    if name == "int8":
        return Int8Weights()
    if name == "int4":
        return Int4Weights(128, zero_point=True)
    if name == "fp8":
        return Fp8Weights()
    raise ValueError(
        f"quantization = {name!r} is invalid: expected none, {', '.join(QUANTIZATIONS)}"
    )


def check_quantization(method: str | None, device: torch.device | str) -> None:
    """Refuse (ValueError) a --quantization the device has no kernel for."""
    if method in (None, "none"):
        return
    make_method(method)  # an unknown name raises the message naming the choices
    dev = torch.device(device)
    if method == "fp8":
        if dev.type != "cuda":
            raise ValueError(
                f"quantization = 'fp8' runs through torch._scaled_mm on CUDA only; the engine "
                f"is on {dev.type} (int8 and int4 run on the CPU)"
            )
        return
    op = f"{method}_linear"
    if not hasattr(torch.ops.sagellm, op) or not torch._C._dispatch_has_kernel_for_dispatch_key(
        f"sagellm::{op}", dev.type.upper()
    ):
        raise ValueError(
            f"quantization = {method!r}: this build of sagellm._C has no {dev.type} kernel for {op}"
        )


def eligible_linears(model: nn.Module) -> list[tuple[str, Linear]]:
    """The Linears that are quantized: all but the token embedding and the LM head."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, Linear)
        and not isinstance(m, Embedding)
        and name.rpartition(".")[2] != "lm_head"
    ]


def apply_quantization(
    model: nn.Module, method: str | None, checkpoint_quant_config: dict[str, Any] | None = None
) -> str | None:
    """Switch each eligible Linear of `model` to a quantized weight method before any weight is
    loaded; returns a label ("int8", "awq int4 g128", ...) or None when nothing changed.

    method: None / "none", or one of QUANTIZATIONS (a dense checkpoint quantized at load).
    checkpoint_quant_config: config.json's `quantization_config` (AWQ / GPTQ), or None.
    Raises ValueError for an unknown method, a method given with a quantized checkpoint, or a
    method the model's device has no kernel for; UnsupportedModelError for a checkpoint format
    int4_linear cannot run.
    """
    method = None if method in (None, "none") else method
    ckpt = parse_quant_config(checkpoint_quant_config)
    if method is not None and method not in QUANTIZATIONS:
        make_method(method)  # raises the message naming the choices
    if method is not None and ckpt is not None:
        raise ValueError(
            f"quantization = {method!r} cannot be applied to a checkpoint that is already "
            f"quantized ({ckpt.name}); leave it unset"
        )
    if method is None and ckpt is None:
        return None
    if ckpt is not None and getattr(model, "tp", None) is not None:
        raise UnsupportedModelError(
            f"{ckpt.name} checkpoints cannot be split for tensor parallelism yet (their packed "
            "words hold 8 rows or columns each); load them with tensor_parallel_size 1"
        )
    check_quantization("int4" if ckpt else method, getattr(model, "device", "cpu"))
    for _, layer in eligible_linears(model):
        layer.use_method(Int4Weights(checkpoint=ckpt) if ckpt else make_method(method))
    model.quantization = ckpt.name if ckpt else method  # what the engine's log and stats name
    return model.quantization


def quantize_for_checkpoint(model: nn.Module, method: str | None, ckpt) -> str | None:
    """apply_quantization for a LoadedCheckpoint (the engine's and each TP rank's load path):
    refuses a method for a GGUF file, whose blocks are already quantized."""
    if method not in (None, "none") and ckpt.format == "gguf":
        raise ValueError(
            f"quantization = {method!r} applies to dense checkpoints; {ckpt.source} is a GGUF "
            "file, whose quantized blocks already run natively (leave quantization unset)"
        )
    return apply_quantization(model, method, ckpt.config.hf_config.get("quantization_config"))


def weight_kernels(model: nn.Module) -> dict[str, tuple[str, int]]:
    """What multiplies each Linear: {method: (kernel, layers)}, for the load log and
    `sage-llm info`, e.g. {"int4": ("int4_linear g64 symmetric (cpu)", 60), ...}."""
    counts: Counter[tuple[str, str]] = Counter()
    for _, layer in eligible_linears(model):
        m = layer.method
        kernel = m.kernel(layer) if hasattr(m, "kernel") else m.name
        counts[(m.name, kernel)] += 1
    out: dict[str, tuple[str, int]] = {}
    for (name, kernel), n in counts.items():
        prev = out.get(name)
        out[name] = (
            kernel if prev is None else f"{prev[0]} / {kernel}",
            n + (prev[1] if prev else 0),
        )
    return out
