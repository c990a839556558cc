"""Engine configuration: every default in one place, validated at the edge."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

# --kv-cache-dtype values other than auto (the model dtype): the cache's storage dtype.
KV_CACHE_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}


@dataclass
class EngineConfig:
    """How one engine runs one model.

    model: a local directory or .gguf file, a Hugging Face id (from the local cache, or the Hub
        when online), or None for the built-in default (SmolLM2-135M-Instruct, GGUF).
    dtype: auto | float32 | bfloat16 | float16: the activations' dtype (and the weights', where
        they are dense). auto: float32 on the CPU for GGUF and fp16 checkpoints, the checkpoint's
        own dtype otherwise; bfloat16 on CUDA. With auto, a GGUF file's quantized weights stay
        in their block format wherever gguf_linear has a kernel for them on the device (on the
        CPU: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K); naming a dtype dequantizes all.
    kv_cache_memory_gb: KV cache size; None sizes it from free memory (CPU: a quarter of the
        available RAM, at most 4 GiB; CUDA: kv_cache_fraction of what the weights leave free).
    max_num_batched_tokens: the per-step token budget (chunked prefill splits longer prompts).
    enforce_eager: on CUDA, run every step eagerly instead of replaying captured CUDA graphs for
        decode-only steps (the CPU never uses graphs).
    cuda_graph_max_batch: the largest decode batch captured as a CUDA graph (also bounded by
        max_num_seqs and max_num_batched_tokens); larger decode batches run eagerly.
    quantization: none | int8 | int4 | fp8: quantize a dense checkpoint's Linear weights at load
        and keep them quantized (int8: per channel, int8_linear; int4: groups of 128 input
        columns with zero points, int4_linear; fp8: e4m3 per channel, torch._scaled_mm, CUDA);
        the token embedding and LM head stay dense. AWQ / GPTQ 4-bit checkpoints are detected
        from their config.json and need no flag. Refused for a GGUF file (already quantized).
    kv_cache_dtype: auto | int8 | fp8_e4m3: how the KV cache stores keys and values. auto: in the
        model dtype; int8 / fp8_e4m3: one byte per element plus one fp32 scale per cached token
        and KV head (symmetric, scale = max|row| / 127 or / 448), so the same memory holds about
        2x (bf16) to 4x (fp32) as many tokens. A device or build that cannot run it is refused at
        start-up.
    tensor_parallel_size: ranks the model is split over (one process each: the engine starts
        the others, or joins a torchrun launch); gloo on the CPU, NCCL on CUDA (one GPU a rank).
    distributed_timeout_s: how long any collective may wait for a peer before the engine
        raises (a dead or hung worker).
    """

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory_gb: float | None = None
    kv_cache_fraction: float = 0.85
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    enable_prefix_caching: bool = True
    num_threads: int | None = None
    seed: int = 0
    trust_remote_code: bool = False
    revision: str | None = None
    load_progress: bool = True
    enforce_eager: bool = False
    cuda_graph_max_batch: int = 256
    kv_cache_dtype: str = "auto"
    quantization: str | None = None
    tensor_parallel_size: int = 1
    distributed_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        def bad(field: str, value, allowed: str) -> ValueError:
            return ValueError(f"{field} = {value!r} is invalid: expected {allowed}")

        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise bad("dtype", self.dtype, "auto, float32, bfloat16 or float16")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise bad("device", self.device, "auto, cpu, cuda or cuda:N")
        if self.block_size < 1 or self.block_size > 1024:
            raise bad("block_size", self.block_size, "1..1024")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise bad("max_model_len", self.max_model_len, "a positive integer")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise bad("kv_cache_memory_gb", self.kv_cache_memory_gb, "> 0")
        if not 0 < self.kv_cache_fraction <= 1:
            raise bad("kv_cache_fraction", self.kv_cache_fraction, "in (0, 1]")
        if self.max_num_seqs < 1:
            raise bad("max_num_seqs", self.max_num_seqs, ">= 1")
        if self.max_num_batched_tokens < 1:
            raise bad("max_num_batched_tokens", self.max_num_batched_tokens, ">= 1")
        if self.num_threads is not None and self.num_threads < 1:
            raise bad("num_threads", self.num_threads, ">= 1")
        if self.cuda_graph_max_batch < 1:
            raise bad("cuda_graph_max_batch", self.cuda_graph_max_batch, ">= 1")
        if isinstance(self.tensor_parallel_size, bool) or self.tensor_parallel_size < 1:
            raise bad("tensor_parallel_size", self.tensor_parallel_size, ">= 1")
        if not self.distributed_timeout_s > 0:
            raise bad("distributed_timeout_s", self.distributed_timeout_s, "> 0")
        if self.quantization not in (None, "none", "int8", "int4", "fp8"):
            raise bad("quantization", self.quantization, "none, int8, int4 or fp8")
        if self.quantization == "fp8" and self.device == "cpu":
            raise ValueError("quantization = 'fp8' runs on CUDA only (torch._scaled_mm)")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise bad("kv_cache_dtype", self.kv_cache_dtype, "auto, int8 or fp8_e4m3")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device = 'cuda' but no CUDA device is available")
        return dev

    def resolved_kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's storage dtype: the model's (auto), int8 or float8_e4m3fn."""
        if self.kv_cache_dtype == "auto":
            return model_dtype
        return KV_CACHE_DTYPES[self.kv_cache_dtype]

    def resolved_dtype(
        self, checkpoint_dtype: torch.dtype | None, fmt: str, device: torch.device
    ) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if device.type == "cuda":
            return torch.float16 if checkpoint_dtype == torch.float16 else torch.bfloat16
        if fmt == "gguf" or checkpoint_dtype in (None, torch.float16):
            return torch.float32
        return checkpoint_dtype
