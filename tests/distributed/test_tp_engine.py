"""The engine with --tensor-parallel-size 2 (gloo, 2 CPU processes) against 1 process: the same
greedy tokens and logits within tolerance, for a Llama whose KV heads split across ranks, a Qwen2
with qkv bias and one KV head (replicated on both ranks); shards hold and read only their
slices; a worker that dies or hangs makes the engine raise instead of hanging."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from sagellm.runtime.config import EngineConfig
from sagellm.runtime.engine import LLMEngine
from sagellm.runtime.params import SamplingParams
from sagellm.runtime.tp_executor import TensorParallelError
from tests.tiny_models import load_reference_tokenizer, tiny_config, write_tiny_checkpoint

NEW_TOKENS = 10
PROMPTS = [[11, 22, 33, 44, 55, 66, 77, 88, 99, 111] * 3, [5, 6, 7], [1000, 2000, 3000, 4000, 5]]


@pytest.fixture(scope="module")
def tokenizer():
    return load_reference_tokenizer()


def _write(name: str, folder, tokenizer):
    if name == "llama_kv2":  # 4 q heads in 2 KV groups: one KV head per rank
        import transformers as tf
        from transformers import AutoModelForCausalLM

        cfg = tiny_config("llama", len(tokenizer))
        cfg = tf.LlamaConfig(
            **{**cfg.to_dict(), "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}
        )
        torch.manual_seed(3)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder
    return write_tiny_checkpoint(name, folder, tokenizer)


def _engine(model, tp: int, **kw) -> LLMEngine:
    cfg = EngineConfig(
        model=str(model) if model is not None else None,
        load_progress=False,
        num_threads=1,
        tensor_parallel_size=tp,
        kv_cache_memory_gb=0.02,
        **kw,
    )
    return LLMEngine(cfg)


def _generate(engine: LLMEngine, prompts=PROMPTS, n=NEW_TOKENS):
    params = SamplingParams(max_tokens=n, ignore_eos=True, logprobs=1)
    outs = engine.generate(prompts, params)
    tokens = [o.token_ids for o in outs]
    logprobs = torch.tensor([[lp.logprob for lp in o.logprobs] for o in outs])
    return tokens, logprobs


@pytest.mark.parametrize(
    "arch,reduce",
    [
        ("llama_kv2", "allreduce"),
        ("llama_kv2", "gather"),
        ("qwen2", "allreduce"),
        ("llama", "gather"),
    ],
)
def test_tp2_equals_tp1(arch, reduce, tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("SAGELLM_TP_REDUCE", reduce)  # the spawned worker inherits it
    folder = _write(arch, tmp_path / arch, tokenizer)
    one = _engine(folder, 1, dtype="float32")
    try:
        want_tokens, want_lp = _generate(one)
    finally:
        one.close()
    two = _engine(folder, 2, dtype="float32")
    try:
        assert two.executor is not None and len(two.executor.procs) == 1
        got_tokens, got_lp = _generate(two)
        # Rank 0 holds half of every split weight (heads, MLP columns, vocabulary).
        cfg = two.model_config
        attn = two.model.model.layers[0].self_attn
        kv_local = two.model.num_kv_heads
        assert kv_local == max(1, cfg.num_kv_heads // 2)
        q_local = attn.attn.num_heads
        assert q_local == cfg.num_heads // 2
        d = cfg.head_size
        assert attn.qkv_proj.weight.shape == ((q_local + 2 * kv_local) * d, cfg.hidden_size)
        mlp = two.model.model.layers[0].mlp
        if reduce == "allreduce":  # input columns split, partial sums all-reduced
            assert attn.o_proj.weight.shape == (cfg.hidden_size, q_local * d)
            assert mlp.down_proj.weight.shape == (cfg.hidden_size, cfg.intermediate_size // 2)
        else:  # output rows split, inputs and outputs gathered
            assert attn.o_proj.weight.shape == (cfg.hidden_size // 2, cfg.num_heads * d)
            assert mlp.down_proj.weight.shape == (cfg.hidden_size // 2, cfg.intermediate_size)
        assert two.model.model.embed_tokens.weight.shape[0] == cfg.vocab_size // 2
        assert two.runner.kv_caches[0].shape[3] == kv_local
        assert two.block_manager.num_used_blocks == 0
    finally:
        two.close()
    assert got_tokens == want_tokens
    if reduce == "gather":  # every output element computed as on one process
        torch.testing.assert_close(got_lp, want_lp, atol=0, rtol=0)
    else:
        torch.testing.assert_close(got_lp, want_lp, atol=1e-4, rtol=1e-4)


def test_shard_reads_only_its_slices(tmp_path, tokenizer, monkeypatch):
    """Rank 1's shard built in process (loading needs no collective): every element read from
    the checkpoint lands in a parameter, and each parameter equals its slice of the full one."""
    from safetensors.torch import load_file

    from sagellm.distributed.group import TPGroup
    from sagellm.models import sharded_checkpoint as sc
    from sagellm.models.registry import model_class

    folder = _write("qwen2", tmp_path / "qwen2", tokenizer)
    read = []
    narrow = sc.TensorWeight.narrow

    def counting(self, *a, **kw):
        t = narrow(self, *a, **kw)
        read.append(t.numel())
        return t

    monkeypatch.setattr(sc.TensorWeight, "narrow", counting)
    ckpt = sc.load_sharded_checkpoint(str(folder), torch.float32, load_tokenizer=False)
    tp = TPGroup(rank=1, size=2, group_name="unused")
    model = model_class(ckpt.config.architecture)(ckpt.config, torch.float32, "cpu", tp)
    model.load_weights(ckpt.weights.items())
    held = sum(p.numel() for p in model.parameters())
    assert sum(read) == held, f"read {sum(read)} elements to fill {held}"
    full = load_file(str(folder / "model.safetensors"))
    cfg, d = ckpt.config, ckpt.config.head_size
    layer = model.model.layers[1]
    # qwen2 tiny: 2 q heads, 1 KV head: rank 1 has q head 1 and the (replicated) KV head 0.
    q = full["model.layers.1.self_attn.q_proj.weight"][d : 2 * d]
    k = full["model.layers.1.self_attn.k_proj.weight"]
    v = full["model.layers.1.self_attn.v_proj.weight"]
    torch.testing.assert_close(layer.self_attn.qkv_proj.weight, torch.cat([q, k, v]))
    qb = full["model.layers.1.self_attn.q_proj.bias"][d : 2 * d]
    kvb = [full[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "kv"]
    torch.testing.assert_close(layer.self_attn.qkv_proj.bias, torch.cat([qb, *kvb]))
    half = cfg.intermediate_size // 2
    torch.testing.assert_close(
        layer.mlp.down_proj.weight, full["model.layers.1.mlp.down_proj.weight"][:, half:]
    )
    vocab_half = cfg.vocab_size - cfg.vocab_size // 2
    assert model.lm_head.weight.shape[0] == vocab_half


def test_worker_death_and_hang_raise(tmp_path, tokenizer):
    folder = _write("llama", tmp_path / "llama", tokenizer)
    engine = _engine(folder, 2, dtype="float32", distributed_timeout_s=4)
    try:
        _generate(engine, n=2)
        worker = engine.executor.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        t0 = time.monotonic()
        with pytest.raises(
            TensorParallelError, match=r"worker rank 1 \(pid \d+\) exited with code -9"
        ):
            _generate(engine, n=2)
        assert time.monotonic() - t0 < 4
    finally:
        engine.close()

    engine = _engine(folder, 2, dtype="float32", distributed_timeout_s=3)
    try:
        _generate(engine, n=2)
        os.kill(engine.executor.procs[0].pid, signal.SIGSTOP)  # alive but never answers
        t0 = time.monotonic()
        with pytest.raises(TensorParallelError, match="did not answer within 3 s"):
            _generate(engine, n=4)
        assert time.monotonic() - t0 < 3 + 10
    finally:
        engine.close()
    assert engine.executor is None


def test_default_smollm2_tp2_equals_one_process(monkeypatch):
    """The issue's target: the default SmolLM2 (GGUF, Q4_1 blocks kept; 9 heads in 3 KV groups
    split 6 + 3) gives the same greedy output with 2 gloo ranks as with 1 process, bit for bit
    (the CPU's default exact row-parallel layers)."""
    monkeypatch.delenv("SAGELLM_TP_REDUCE", raising=False)
    prompts = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,"]
    one = _engine(None, 1)
    try:
        want, want_lp = _generate(one, prompts, 16)
    finally:
        one.close()
    two = _engine(None, 2)
    try:
        assert two.model.model.layers[0].self_attn.attn.num_heads == 6
        assert two.model.num_kv_heads == 2
        got, got_lp = _generate(two, prompts, 16)
    finally:
        two.close()
    assert got == want
    torch.testing.assert_close(got_lp, want_lp, atol=0, rtol=0)
