"""The backends of `sage-llm bench throughput`: each loads the same weights its own way, warms
up untimed, runs the whole workload, and returns only what it measured.

sagellm: one engine.generate over every prompt, each with its own max_tokens and ignore_eos.
transformers: `generate` in padded batches (it has no per-prompt output length).
llamacpp: the GGUF as stored, one prompt after another (its Python API has no batching).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    batch1_prompt: list[int]
    batch1_output_len: int
    warmup_prompts: list[list[int]]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


@dataclass
class ModelSource:
    """Where the weights are: `path` is a folder (config.json) or a .gguf file."""

    path: Path
    kind: str  # "hf" or "gguf"
    config: Any  # sagellm.models.config.ModelConfig
    tokenizer: Any  # the Hugging Face tokenizer
    shape: str | None = None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _batch_figures(wall_s: float, output_tokens: int, prompt_tokens: int) -> dict[str, Any]:
    return {
        "wall_s": wall_s,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "output_tok_s": output_tokens / wall_s,
        "total_tok_s": (prompt_tokens + output_tokens) / wall_s,
    }


def _batch1_figures(start: float, times: list[float], expected: int) -> dict[str, Any]:
    if len(times) != expected:
        raise RuntimeError(f"batch-1 run produced {len(times)} tokens, {expected} were asked for")
    return {
        "output_tokens": len(times),
        "ttft_ms": (times[0] - start) * 1e3,
        "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]),
        "e2e_tok_s": len(times) / (times[-1] - start),
    }


def _is_embedding(module: torch.nn.Module) -> bool:
    # torch's, or sageLLM's (a Linear read by rows, with `unembed` for a tied LM head).
    if isinstance(module, torch.nn.Embedding):
        return True
    return hasattr(module, "unembed") and isinstance(getattr(module, "weight", None), torch.Tensor)


def weight_bytes(model: torch.nn.Module, tied: bool) -> int:
    """Bytes a batch-1 decode step reads: every parameter once, except an untied input
    embedding, of which a step reads a single row."""
    embeddings = {id(m.weight) for m in model.modules() if _is_embedding(m)}
    return sum(
        p.numel() * p.element_size()
        for p in model.parameters()  # shared (tied) parameters come once
        if tied or id(p) not in embeddings
    )


def run_sagellm(args: argparse.Namespace, source: ModelSource, work: Workload) -> dict:
    from sagellm.runtime.config import EngineConfig
    from sagellm.runtime.engine import LLMEngine
    from sagellm.runtime.params import SamplingParams

    warmup_tokens = 4
    longest = max(
        *(len(p) + n for p, n in zip(work.prompts, work.output_lens)),
        *(len(p) + warmup_tokens for p in work.warmup_prompts),
        len(work.batch1_prompt) + work.batch1_output_len,
    )
    optional = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_memory_gb": args.kv_cache_gb,
        "enforce_eager": getattr(args, "enforce_eager", False) or None,
        # benchmarks/throughput.py --quantization none,int8,int4 sweeps the weight formats
        "quantization": getattr(args, "quantization", None),
    }
    engine = LLMEngine(
        EngineConfig(
            model=str(source.path),
            dtype=args.dtype,
            device=args.device,
            # Sized to this workload so the KV cache is not reserved for 8k-token sequences.
            max_model_len=longest,
            num_threads=args.threads,
            load_progress=False,
            **{key: value for key, value in optional.items() if value is not None},
        )
    )
    result: dict[str, Any] = {
        "load_time_s": engine.load_time_s,
        "weight_bytes": weight_bytes(engine.model, engine.model.tied_embeddings()),
    }
    engine.generate(work.warmup_prompts, SamplingParams(max_tokens=warmup_tokens, ignore_eos=True))
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in work.output_lens]
    start = time.perf_counter()
    outs = engine.generate(work.prompts, params)
    _sync(args.device)
    wall = time.perf_counter() - start
    got = [len(o.token_ids) for o in outs]
    if got != work.output_lens:
        raise RuntimeError(f"sageLLM generated {sum(got)} tokens, {work.output_tokens} asked for")
    result["batch"] = _batch_figures(wall, sum(got), work.prompt_tokens)
    metrics = [o.metrics for o in outs if o.metrics is not None]
    if metrics:
        result["batch"]["mean_ttft_ms"] = sum(m.ttft_ms for m in metrics) / len(metrics)
        result["batch"]["mean_tpot_ms"] = sum(m.tpot_ms for m in metrics) / len(metrics)
    kept = ("steps", "preemptions", "peak_mem_mb", "cuda_graph_replays", "kv_capacity_tokens")
    result["stats"] = {k: v for k, v in engine.stats().items() if k in kept}
    result["stats"]["dtype"] = str(engine.dtype).removeprefix("torch.")
    result["stats"]["kv_cache_gb"] = engine.runner.kv_cache_bytes() / 2**30
    result["stats"]["max_num_seqs"] = engine.config.max_num_seqs
    result["stats"]["max_num_batched_tokens"] = engine.config.max_num_batched_tokens
    if engine.runner.graphs is not None:
        result["stats"]["cuda_graph_buckets"] = engine.runner.graphs.buckets
        result["stats"]["cuda_graph_capture_s"] = engine.graph_capture_s
        result["stats"]["cuda_graph_memory_mb"] = engine.graph_memory_mb
    if args.batch_1:
        sp = SamplingParams(max_tokens=work.batch1_output_len, ignore_eos=True)
        rid = engine.add_request(work.batch1_prompt, sp)
        start, times = time.perf_counter(), []
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id == rid:
                    times.extend(time.perf_counter() for _ in out.new_token_ids)
        result["batch_1"] = _batch1_figures(start, times, work.batch1_output_len)
    return result


class _TokenClock:
    """A transformers streamer that only notes when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:  # the first call carries the prompt
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def _hf_generate(model, prompts, max_new: int, pad: int, device: str, streamer=None) -> int:
    """Left-padded greedy batch forced to `max_new` tokens; returns the new-token width."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        do_sample=False,
        max_new_tokens=max_new,
        min_new_tokens=max_new,
        pad_token_id=pad,
        streamer=streamer,
    )
    _sync(device)
    return out.shape[1] - width


def run_transformers(args: argparse.Namespace, source: ModelSource, work: Workload) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM

    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    # Generation-config chatter and loading bars would bury the table.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        start = time.perf_counter()
        if source.kind == "gguf":
            where = {"gguf_file": source.path.name}
            folder = source.path.parent
        else:
            where, folder = {}, source.path
        if args.device != "cpu":
            where["device_map"] = args.device  # straight to the GPU, no host copy of 8B weights
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=DTYPES[args.dtype], attn_implementation="sdpa", **where
        )
        model = model.to(args.device).eval()
        _sync(args.device)
        result: dict[str, Any] = {
            "load_time_s": time.perf_counter() - start,
            "weight_bytes": weight_bytes(model, bool(model.config.tie_word_embeddings)),
        }
        tok = source.tokenizer
        pad = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
        _hf_generate(model, work.warmup_prompts, 4, pad, args.device)
        order = sorted(range(len(work.prompts)), key=lambda i: work.output_lens[i])
        size, padded = args.hf_batch_size, 0
        start = time.perf_counter()
        for first in range(0, len(order), size):
            chunk = order[first : first + size]
            longest = max(work.output_lens[i] for i in chunk)
            got = _hf_generate(model, [work.prompts[i] for i in chunk], longest, pad, args.device)
            if got != longest:
                raise RuntimeError(f"transformers generated {got} tokens, {longest} asked for")
            padded += longest * len(chunk)
        wall = time.perf_counter() - start
        result["batch"] = _batch_figures(wall, work.output_tokens, work.prompt_tokens)
        result["batch"]["generated_tokens_with_padding"] = padded
        result["batch"]["batch_size"] = size
        if args.batch_1:
            clock = _TokenClock()
            start = time.perf_counter()
            _hf_generate(
                model, [work.batch1_prompt], work.batch1_output_len, pad, args.device, clock
            )
            result["batch_1"] = _batch1_figures(start, clock.times, work.batch1_output_len)
        return result
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()


def run_llamacpp(args: argparse.Namespace, source: ModelSource, work: Workload) -> dict:
    """llama.cpp on the GGUF as stored (quantized weights, its own kernels); its Python API has
    no batching, so the batch runs one prompt after another."""
    from llama_cpp import Llama

    threads = args.threads or torch.get_num_threads()
    longest = max(len(p) + n for p, n in zip(work.prompts, work.output_lens))
    n_ctx = max(longest, len(work.batch1_prompt) + work.batch1_output_len) + 1
    start = time.perf_counter()
    llm = Llama(model_path=str(source.path), n_ctx=n_ctx, n_threads=threads, verbose=False)
    result: dict[str, Any] = {"load_time_s": time.perf_counter() - start}
    top = max(max(p) for p in [*work.prompts, work.batch1_prompt])
    if top >= llm.n_vocab():
        raise RuntimeError(f"token id {top} is outside llama.cpp's vocabulary of {llm.n_vocab()}")

    def generate(prompt: list[int], n: int, clock: list[float] | None = None) -> int:
        llm.reset()
        count = 0
        # generate() never stops by itself (EOS is the caller's business): ignore_eos for free.
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            count += 1
            if clock is not None:
                clock.append(time.perf_counter())
            if count >= n:
                break
        return count

    for prompt in work.warmup_prompts:
        generate(prompt, 4)
    start = time.perf_counter()
    produced = sum(generate(p, n) for p, n in zip(work.prompts, work.output_lens))
    wall = time.perf_counter() - start
    result["batch"] = _batch_figures(wall, produced, work.prompt_tokens)
    if args.batch_1:
        clock: list[float] = []
        start = time.perf_counter()
        generate(work.batch1_prompt, work.batch1_output_len, clock)
        result["batch_1"] = _batch1_figures(start, clock, work.batch1_output_len)
    return result


BACKENDS = {"sagellm": run_sagellm, "transformers": run_transformers, "llamacpp": run_llamacpp}


def llamacpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True
