"""What every model definition shares: the forward contract, weight loading by Hugging Face
names, and the KV cache shape it needs.

Forward contract (one engine step, a packed batch without padding):
    hidden = model(input_ids [T] int64, positions [T] int64, kv_caches: list per layer of
                   [2, num_blocks, block_size, num_kv_heads, head_size], meta: AttentionMetadata)
    logits = model.compute_logits(hidden[rows])          # [rows, vocab], fp32

Under tensor parallelism (`tp`, a TPGroup of 2+ ranks) every rank builds its shard of the model
and runs the same forward with the same inputs; the layers' collectives make `hidden` and the
logits whole on every rank, and the KV cache holds only this rank's KV heads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from sagellm.models.config import ModelConfig
from sagellm.models.errors import CorruptCheckpointError
from sagellm.models.gguf_loader import GGUFWeight
from sagellm.models.layers.linear import GGUFWeights, Linear
from sagellm.models.layers.norm import RMSNorm
from sagellm.models.layers.quant_weights import CHECKPOINT_LEAVES, CheckpointTensor
from sagellm.models.sharded_checkpoint import LazyWeight

if TYPE_CHECKING:
    from sagellm.distributed.group import TPGroup


class CausalLM(nn.Module):
    # (pattern, replacement, shard): checkpoint names whose weights land in a fused layer.
    fused_names: list[tuple[str, str, str]] = []
    # Checkpoint names that carry nothing we need (rotary caches, attention-mask buffers).
    ignored_names: list[str] = [r"rotary_emb\.inv_freq$", r"\.attn\.(masked_)?bias$"]
    # Checkpoint Conv1D weights stored [in, out] (GPT-2): transposed at load.
    transposed_names: list[str] = []

    # Whether the architecture can be split across ranks (its layers take a TPGroup).
    supports_tensor_parallel = False

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device | str,
        tp: TPGroup | None = None,
    ):
        super().__init__()
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        if tp is not None and tp.size > 1 and not self.supports_tensor_parallel:
            from sagellm.models.errors import UnsupportedModelError

            raise UnsupportedModelError(
                f"{config.architecture} has no tensor-parallel implementation "
                "(llama, mistral, qwen2, qwen3, gemma3 have)"
            )
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.heads = None  # this rank's HeadSplit under tensor parallelism
        if self.tp is not None:
            from sagellm.distributed.sharding import split_heads

            self.heads = split_heads(config.num_heads, config.num_kv_heads, tp.size, tp.rank)

    # -- shapes ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def num_kv_heads(self) -> int:
        """KV heads this rank caches (all of them without tensor parallelism)."""
        return self.heads.num_kv_heads if self.heads is not None else self.config.num_kv_heads

    @property
    def head_size(self) -> int:
        return self.config.head_size

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_size)

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        el = torch.empty((), dtype=dtype or self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_size * el

    # -- weights ---------------------------------------------------------------------------
    def tied_embeddings(self) -> bool:
        return bool(self.config.tie_word_embeddings)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | GGUFWeight]]) -> None:
        """Load checkpoint tensors by their Hugging Face names; every parameter must be set.

        A GGUFWeight (GGUF blocks kept as stored) switches the Linear it lands in to GGUFWeights
        before anything is loaded into it; anywhere else it is dequantized. A LazyWeight
        (sharded_checkpoint) is read when loaded: a split Linear reads only its slice.
        """
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())
        fused = [(re.compile(p), r, s) for p, r, s in self.fused_names]
        ignored = [re.compile(p) for p in self.ignored_names]
        transposed = [re.compile(p) for p in self.transposed_names]
        plan = []
        for name, tensor in weights:
            if any(p.search(name) for p in ignored):
                continue
            if name == "lm_head.weight" and self.tied_embeddings():
                continue
            if any(p.search(name) for p in transposed):
                tensor = tensor.t()
            target, shard = name, None
            for pattern, repl, s in fused:
                if pattern.search(name):
                    target, shard = pattern.sub(repl, name), s
                    break
            mod_name, _, leaf = target.rpartition(".")
            plan.append((name, target, mod_name, modules.get(mod_name), leaf, shard, tensor))
        for *_, module, leaf, _, tensor in plan:
            blocks = isinstance(tensor, GGUFWeight) or getattr(tensor, "keeps_blocks", False)
            if isinstance(module, Linear) and leaf == "weight" and blocks:
                module.use_method(GGUFWeights())
        loaded: set[str] = set()
        for name, target, mod_name, module, leaf, shard, tensor in plan:
            if isinstance(module, Linear) and leaf in CHECKPOINT_LEAVES:
                # A pre-quantized (AWQ / GPTQ) Linear: its weight method gathers the parts.
                if not getattr(module.method, "checkpoint", None):
                    raise CorruptCheckpointError(
                        f"{name}: a pre-quantized tensor, but {mod_name} was not set up for the "
                        "checkpoint's quantization_config (see quant_weights.apply_quantization)"
                    )
                if isinstance(tensor, LazyWeight):
                    tensor = tensor.load()
                module.method.load(module, shard, CheckpointTensor(leaf, tensor))
                if leaf == "qweight":
                    loaded.add(f"{mod_name}.weight" + (f"[{shard}]" if shard else ""))
                continue
            if isinstance(module, Linear) and leaf in ("weight", "bias"):
                (module.load_weight if leaf == "weight" else module.load_bias)(tensor, shard)
                loaded.add(f"{mod_name}.{leaf}" + (f"[{shard}]" if shard else ""))
                continue
            if isinstance(tensor, LazyWeight):
                tensor = tensor.load()
            if isinstance(tensor, GGUFWeight):
                tensor = tensor.dequantize(self.dtype)
            if isinstance(module, RMSNorm) and leaf == "weight":
                module.load_weight(tensor)
                loaded.add(target)
            elif target in params:
                p = params[target]
                if p.shape != tensor.shape:
                    raise CorruptCheckpointError(
                        f"{name}: shape {tuple(tensor.shape)} does not match the model's {tuple(p.shape)}"
                    )
                p.data.copy_(tensor)
                loaded.add(target)
            else:
                raise CorruptCheckpointError(
                    f"checkpoint tensor {name!r} has no place in {type(self).__name__}"
                )
        for module in self.modules():
            if isinstance(module, Linear):
                module.finish_loading()
        missing = sorted(set(self.expected_weights()) - loaded)
        if missing:
            shown = ", ".join(missing[:6]) + (
                f" and {len(missing) - 6} more" if len(missing) > 6 else ""
            )
            raise CorruptCheckpointError(f"checkpoint is missing weights: {shown}")

    def expected_weights(self) -> list[str]:
        """Every weight a checkpoint must provide, in the names load_weights records."""
        names: list[str] = []
        owned: set[str] = set()
        for mod_name, module in self.named_modules():
            if isinstance(module, Linear):
                for s in list(module._shards) or [None]:
                    suffix = f"[{s}]" if s else ""
                    names.append(f"{mod_name}.weight{suffix}")
                    if module.bias is not None:
                        names.append(f"{mod_name}.bias{suffix}")
                owned.update(f"{mod_name}.{n}" for n, _ in module.named_parameters(recurse=False))
            elif isinstance(module, RMSNorm):
                names.append(f"{mod_name}.weight")
                owned.add(f"{mod_name}.weight")
        names += [n for n, _ in self.named_parameters() if n not in owned]
        return names

    # -- compute ---------------------------------------------------------------------------
    def forward(self, input_ids, positions, kv_caches, meta):  # pragma: no cover - abstract
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
