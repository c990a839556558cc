"""4-bit checkpoint formats (AWQ, GPTQ) read into int4_linear's layout.

int4_linear's layout (csrc/torch_bindings.cpp), per Linear with weight W [N, K]:
    weight uint8 [N, K / 2]: byte j of row n holds k = 2j (low nibble) and k = 2j + 1 (high);
    scales fp32 [N, K / G]; zeros uint8 [N, K / G] in 0..15, or None for 8;
    W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G].

Both checkpoint formats store the transposed problem (x @ W^T with W^T [K, N]) in int32 words of
eight 4-bit values, with scales fp16 [K / G, N] and W^T[k, n] = (q - z) * s:
- AWQ (AutoAWQ "gemm" version): qweight [K, N / 8] and qzeros [K / G, N / 8] are packed along N;
  nibble i (bits 4i..4i+3) of word c holds column n = 8c + AWQ_ORDER[i] (an interleave its CUDA
  kernel unpacks cheaply). Zeros are stored as they are.
- GPTQ (AutoGPTQ / GPTQModel): qweight [K / 8, N] is packed along K, nibble j of word r holding
  k = 8r + j; qzeros [K / G, N / 8] along N in natural order (nibble j of word c: n = 8c + j).
  The original ("gptq", v1) format stores each zero minus one, so a symmetric checkpoint's 8 is
  stored as 7; GPTQModel's "gptq_v2" stores the zero itself. g_idx [K] int32 maps each input
  column to its group: k // G unless the checkpoint was quantized in activation order
  (desc_act), which int4_linear's contiguous groups cannot express: refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sagellm.models.errors import CorruptCheckpointError, UnsupportedModelError
from sagellm.ops.quant import INT4_GROUP_SIZES, pack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


@dataclass(frozen=True)
class CheckpointQuant:
    """A pre-quantized checkpoint's `quantization_config`, validated."""

    method: str  # "awq" | "gptq"
    group_size: int
    zero_offset: int  # added to stored zeros: 1 for GPTQ v1, else 0
    skip: tuple[str, ...] = ()  # modules the checkpoint keeps dense (substrings of names)

    @property
    def name(self) -> str:
        return f"{self.method} int4 g{self.group_size}"


def parse_quant_config(cfg: dict[str, Any] | None) -> CheckpointQuant | None:
    """config.json's `quantization_config` -> CheckpointQuant; None when there is none.

    Raises UnsupportedModelError for a method or setting int4_linear cannot run.
    """
    if not cfg:
        return None
    if not isinstance(cfg, dict):
        raise CorruptCheckpointError(f"quantization_config is a {type(cfg).__name__}, not a dict")
    method = str(cfg.get("quant_method", "")).lower()
    if method not in ("awq", "gptq"):
        raise UnsupportedModelError(
            f"quantization_config.quant_method = {cfg.get('quant_method')!r} is not supported "
            "(awq and gptq 4-bit checkpoints are; dense checkpoints can be quantized at load "
            "with --quantization int8|int4|fp8)"
        )
    bits = cfg.get("bits", cfg.get("w_bit"))
    if bits != 4:
        raise UnsupportedModelError(
            f"{method} checkpoint with bits = {bits!r}: only 4 is supported"
        )
    group = cfg.get("group_size", cfg.get("q_group_size"))
    if group not in INT4_GROUP_SIZES:
        raise UnsupportedModelError(
            f"{method} checkpoint with group_size = {group!r}: int4_linear runs group sizes "
            f"{', '.join(map(str, INT4_GROUP_SIZES))} (-1, one group per row, is not supported)"
        )
    skip = tuple(cfg.get("modules_to_not_convert") or ())
    if method == "awq":
        version = str(cfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise UnsupportedModelError(
                f"awq checkpoint with version = {cfg.get('version')!r}: only the 'gemm' packing "
                "is supported (gemv / marlin layouts differ)"
            )
        if cfg.get("zero_point", True) is not True:
            raise UnsupportedModelError("awq checkpoint with zero_point = false is not supported")
        return CheckpointQuant("awq", group, 0, skip)
    if cfg.get("desc_act"):
        raise UnsupportedModelError(
            "gptq checkpoint with desc_act = true (activation-order groups) is not supported: "
            "int4_linear needs each group to be G consecutive input columns"
        )
    fmt = str(cfg.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise UnsupportedModelError(
            f"gptq checkpoint with checkpoint_format = {cfg.get('checkpoint_format')!r}: "
            "gptq and gptq_v2 are supported"
        )
    return CheckpointQuant("gptq", group, 1 if fmt == "gptq" else 0, skip)


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] -> uint8 [..., W, 8]: nibble i of each word (bits 4i..4i+3)."""
    shifts = _SHIFTS.to(words.device)
    return ((words.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)


@dataclass
class Int4Parts:
    """One Linear (or one shard's rows) in int4_linear's layout."""

    weight: torch.Tensor  # uint8 [N, K / 2]
    scales: torch.Tensor  # fp32 [N, K / G]
    zeros: torch.Tensor  # uint8 [N, K / G]


def _check(name: str, t: torch.Tensor | None, shape: tuple[int, ...], what: str) -> torch.Tensor:
    if t is None:
        raise CorruptCheckpointError(f"{what}: the checkpoint has no {name}")
    if tuple(t.shape) != shape:
        raise CorruptCheckpointError(f"{what}: {name} has shape {tuple(t.shape)}, expected {shape}")
    return t


def repack(
    quant: CheckpointQuant,
    parts: dict[str, torch.Tensor],
    n: int,
    k: int,
    what: str,
) -> Int4Parts:
    """The qweight / qzeros / scales (/ g_idx) of one Linear of out n, in k -> Int4Parts.

    `what` names the layer in errors. Exact: every stored 4-bit value and scale is kept (fp16
    scales widen to fp32 without rounding).
    """
    g = quant.group_size
    if k % g or n % 8 or k % 8:
        raise UnsupportedModelError(
            f"{what}: in {k} / out {n} do not fit {quant.method} int4 (in a multiple of the "
            f"group size {g}, both multiples of 8)"
        )
    groups = k // g
    qweight, qzeros = parts.get("qweight"), parts.get("qzeros")
    scales = _check("scales", parts.get("scales"), (groups, n), what)
    if quant.method == "awq":
        qweight = _check("qweight", qweight, (k, n // 8), what)
        qzeros = _check("qzeros", qzeros, (groups, n // 8), what)
        order = list(AWQ_ORDER)
        q = torch.empty((k, n // 8, 8), dtype=torch.uint8, device=qweight.device)
        q[..., order] = _nibbles(qweight)  # nibble i -> column 8c + AWQ_ORDER[i]
        q = q.reshape(k, n).t()
        z = torch.empty((groups, n // 8, 8), dtype=torch.uint8, device=qzeros.device)
        z[..., order] = _nibbles(qzeros)
        z = z.reshape(groups, n)
    else:
        qweight = _check("qweight", qweight, (k // 8, n), what)
        qzeros = _check("qzeros", qzeros, (groups, n // 8), what)
        g_idx = parts.get("g_idx")
        if g_idx is not None:
            _check("g_idx", g_idx, (k,), what)
            expected = torch.arange(k, device=g_idx.device) // g
            if not torch.equal(g_idx.to(torch.int64), expected):
                raise UnsupportedModelError(
                    f"{what}: g_idx is not k // {g} (an activation-order / desc_act checkpoint), "
                    "which int4_linear cannot run"
                )
        q = _nibbles(qweight.t()).reshape(n, k)  # row n: word r nibble j -> k = 8r + j
        z = _nibbles(qzeros).reshape(groups, n).to(torch.int16) + quant.zero_offset
        if int(z.max()) > 15:
            raise UnsupportedModelError(
                f"{what}: a zero point of {int(z.max())} (stored as 15 in a GPTQ v1 checkpoint) "
                "is outside int4_linear's 0..15"
            )
        z = z.to(torch.uint8)
    return Int4Parts(
        pack_int4(q.contiguous()),
        scales.t().to(torch.float32).contiguous(),
        z.t().contiguous(),
    )
