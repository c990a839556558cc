"""GGUF weights kept in their file format: GGUFWeights layers on the gguf_linear kernel.

Layer level: a Linear (plain, fused, fused of mixed types, with dense parts) and an Embedding
holding GGUF blocks equal the reference (dequantize, round the input as the kernel does, float64
product) to fp32 rounding. Model level, on the real files: the engine's default ("auto") keeps
the blocks, a named --dtype dequantizes; the quantized model agrees with the dense one.

How closely the models must agree. The kernel rounds activations to int8 blocks of 32 (as
llama.cpp does), which moves the logits a little: on SmolLM2's first tokens the top-5
log-probabilities move by 0.09 nats on average (p99 0.47), and llama.cpp on the same file moves
them as much (it answers "What is the capital of France?" with "L'Étoile..." where the dense
model says "The capital of France is Paris.": the dense model's margin there is 0.08 nats). So:
- greedy sequences may part only at a close call: where they first differ, the dense model
  rated its own token at most CLOSE_CALL nats above the quantized model's choice; and together
  they agree on at least MIN_AGREED of their tokens before parting;
- on the shared prefix, the log-probabilities of the likely tokens (dense log-prob > -3) differ
  by at most LOGPROB_ATOL, and all top-5 log-probabilities by at most LOGPROB_MEAN on average.
"""

from __future__ import annotations

import re
import statistics

import pytest
import torch

from sagellm.models.checkpoint import load_checkpoint
from sagellm.models.gguf_loader import GGUFWeight
from sagellm.models.layers.linear import (
    DenseWeights,
    Embedding,
    GGUFWeights,
    Linear,
    gguf_native_types,
)
from sagellm.ops import quant
from sagellm.ops.reference import quant as ref

pytestmark = pytest.mark.skipif(
    not gguf_native_types("cpu"), reason="this build of sagellm._C has no CPU gguf_linear"
)

Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 6, 8, 12, 13, 14
CLOSE_CALL = 0.5
MIN_AGREED = 0.4
LOGPROB_ATOL = 0.6
LOGPROB_MEAN = 0.15
NEW_TOKENS = 24


def blocks(qtype: int, n: int, k: int, seed: int) -> GGUFWeight:
    g = torch.Generator().manual_seed(seed)
    return GGUFWeight(f"w{seed}", ref.random_gguf_blocks(qtype, n, k, g), qtype, (n, k))


def expected(x: torch.Tensor, parts: list[GGUFWeight | torch.Tensor], bias=None) -> torch.Tensor:
    """Column blocks of the output, each as the kernel computes it (input rounded to int8)."""
    cols = [
        ref.gguf_linear_q8(x, p.data, p.qtype)
        if isinstance(p, GGUFWeight)
        else x.double() @ p.double().T
        for p in parts
    ]
    y = torch.cat(cols, dim=1)
    return y if bias is None else y + bias.double()


def assert_matches(out: torch.Tensor, want: torch.Tensor) -> None:
    # fp32 accumulation over K/32 block products: 1e-5 of the output scale covers it
    scale = want.abs().max().item()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * scale)


# ---- layers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K])
def test_fused_linear_of_one_type_is_one_tensor(qtype):
    k = 512
    layer = Linear(k, shards=[("q", 64), ("k", 32), ("v", 32)], bias=True, name="qkv")
    layer.use_method(GGUFWeights())
    parts = [blocks(qtype, n, k, i) for i, n in enumerate((64, 32, 32))]
    for shard, w in zip("qkv", parts):
        layer.load_weight(w, shard)
    bias = torch.randn(128)
    layer.load_bias(bias[:64], "q"), layer.load_bias(bias[64:96], "k")
    layer.load_bias(bias[96:], "v")
    layer.finish_loading()
    assert layer.method.describe() == [(qtype, 128)] and layer.weight is None
    assert layer.qweight.dtype == torch.uint8
    assert tuple(layer.qweight.shape) == (128, quant.gguf_row_bytes(qtype, k))
    x = torch.randn(5, k)
    assert_matches(layer(x), expected(x, parts, bias))


def test_fused_linear_of_mixed_types_keeps_parts():
    """Gemma 3's layout: q and k Q5_0, v Q8_0 (and here a dense F32 shard too)."""
    k = 256
    layer = Linear(k, shards=[("q", 64), ("k", 32), ("v", 32), ("x", 16)], bias=True, name="mix")
    layer.use_method(GGUFWeights())
    parts = [blocks(Q5_0, 64, k, 1), blocks(Q5_0, 32, k, 2), blocks(Q8_0, 32, k, 3)]
    dense = torch.randn(16, k) * 0.02
    for shard, w in zip("qkvx", [*parts, dense]):
        layer.load_weight(w, shard)
    bias = torch.randn(144)
    for shard, (a, b) in zip("qkvx", [(0, 64), (64, 96), (96, 128), (128, 144)]):
        layer.load_bias(bias[a:b], shard)
    layer.finish_loading()
    assert layer.method.describe() == [(Q5_0, 96), (Q8_0, 32), (None, 16)]
    for m in (1, 9):
        x = torch.randn(m, k)
        assert_matches(layer(x), expected(x, [*parts, dense], bias))


def test_bf16_activations():
    k = 256
    layer = Linear(k, 48, dtype=torch.bfloat16, name="o")
    layer.use_method(GGUFWeights())
    w = blocks(Q4_K, 48, k, 7)
    layer.load_weight(w)
    layer.finish_loading()
    x = torch.randn(3, k).bfloat16()
    out = layer(x)
    assert out.dtype == torch.bfloat16
    want = expected(x, [w])
    torch.testing.assert_close(out.double(), want, rtol=2**-8, atol=1e-5 * want.abs().max())


def test_embedding_rows_are_exact_and_unembed_runs_quantized():
    emb = Embedding(100, 64, dtype=torch.float32, device="cpu", name="embed")
    emb.use_method(GGUFWeights())
    w = blocks(Q8_0, 100, 64, 11)
    emb.load_weight(w)
    emb.finish_loading()
    ids = torch.tensor([[3, 99], [0, 3]])
    table = ref.dequantize_gguf(w.data, Q8_0)
    assert torch.equal(emb(ids), table[ids])
    h = torch.randn(2, 64)
    assert_matches(emb.unembed(h), expected(h, [w]))


def test_bad_gguf_weights_are_refused():
    layer = Linear(64, shards=[("gate", 32), ("up", 32)], name="layers.0.gate_up_proj")
    layer.use_method(GGUFWeights())
    with pytest.raises(ValueError, match=r"gate_up_proj\[gate\].*shape \(16, 64\).*\(32, 64\)"):
        layer.load_weight(blocks(Q8_0, 16, 64, 0), "gate")
    short = blocks(Q8_0, 32, 64, 0)
    short = GGUFWeight("w", short.data[:, :-2].contiguous(), Q8_0, (32, 64))
    with pytest.raises(ValueError, match=r"gate_up_proj\[gate\].*Q8_0 needs uint8 \(32, 68\)"):
        layer.load_weight(short, "gate")
    with pytest.raises(ValueError, match="transposed"):
        layer.load_weight(blocks(Q8_0, 32, 64, 0).t(), "up")
    with pytest.raises(ValueError, match=r"gate_up_proj\[up\] has GGML type id 99"):
        layer.load_weight(
            GGUFWeight("w", torch.zeros(32, 68, dtype=torch.uint8), 99, (32, 64)), "up"
        )
    layer.load_weight(blocks(Q8_0, 32, 64, 0), "up")
    with pytest.raises(ValueError, match="loaded twice"):
        layer.load_weight(blocks(Q8_0, 32, 64, 0), "up")


def test_gpt2_conv1d_weights_stay_quantized():
    """GPT-2's GGUF stores Conv1D weights as (out, in) rows: CausalLM.load_weights transposes
    the transformers name back, which leaves a GGUFWeight that a Linear takes as is."""
    from sagellm.models.config import ModelConfig
    from sagellm.models.registry import build_model

    cfg = ModelConfig.from_hf_dict(
        {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": 64,
            "n_embd": 64,
            "n_layer": 1,
            "n_head": 2,
            "n_positions": 32,
        }
    )
    model = build_model(cfg, torch.float32, "cpu")
    conv1d = re.compile("|".join(model.transposed_names))
    # transformers' names and layouts: Conv1D weights are (in, out)
    dense = {
        n: torch.randn((p.t() if conv1d.search(n) else p).shape) * 0.02
        for n, p in model.state_dict().items()
    }
    weights = dict(dense)
    for name, shape in (
        ("transformer.h.0.attn.c_attn.weight", (192, 64)),
        ("transformer.h.0.mlp.c_fc.weight", (256, 64)),
    ):
        weights[name] = blocks(Q8_0, *shape, seed=len(name)).t()  # as the loader yields them
    weights["transformer.wte.weight"] = blocks(Q8_0, 64, 64, 5)
    model.load_weights(weights.items())
    h0 = model.transformer.h[0]
    assert h0.attn.c_attn.method.describe() == [(Q8_0, 192)]
    assert isinstance(h0.attn.c_proj.method, DenseWeights)
    x = torch.randn(2, 64)
    w = weights["transformer.h.0.attn.c_attn.weight"].t()
    assert_matches(h0.attn.c_attn(x), expected(x, [w], h0.attn.c_attn.bias))
    assert model.compute_logits(x).shape == (2, 64)


# ---- the real files -------------------------------------------------------------------------------


def test_smollm2_loads_its_blocks_as_stored(smollm2_path):
    ck = load_checkpoint(smollm2_path, progress=False, load_tokenizer=False, quantized_on="cpu")
    kept = {n: w for n, w in ck.weights.items() if isinstance(w, GGUFWeight)}
    assert len(kept) == 211 and ck.quantized
    assert {w.type_name for w in kept.values()} == {"Q4_1", "Q8_0"}
    assert all(w.dtype == torch.float32 for n, w in ck.weights.items() if n not in kept)
    assert ck.weight_kernels["Q4_1"] == (f"gguf_linear {quant.gguf_kernel(Q4_1)}", 210)
    assert ck.weight_kernels["F32"] == ("dense float32", 61)
    assert "Q4_1: gguf_linear Q4_1 x int8" in ck.describe_kernels()
    stored = sum(w.data.numel() for w in kept.values())
    dense = load_checkpoint(smollm2_path, dtype="float32", progress=False, load_tokenizer=False)
    assert not dense.quantized
    q = kept["model.layers.2.self_attn.k_proj.weight"]  # un-permuted rows, still exact
    assert torch.equal(q.dequantize(torch.float32), dense.weights[q.name])
    assert stored < 0.25 * sum(t.numel() * 4 for t in dense.weights.values())


MODELS = {
    # name: (raw prompts, chat prompts); SmolLM2 has a chat template, the Gemma GGUF none
    "smollm2": (
        ["The quick brown fox", "Paris is", "1, 2, 3, 4,", "Once upon a time"],
        ["Tell me the capital of France.", "Write a short poem about the sea."],
    ),
    "gemma3": (["The quick brown fox", "def fibonacci(n):\n    ", "Once upon a time"], []),
}


@pytest.fixture(scope="module", params=list(MODELS))
def engines(request):
    from sagellm.runtime.config import EngineConfig
    from sagellm.runtime.engine import LLMEngine

    path = request.getfixturevalue(f"{request.param}_path")
    common = dict(model=str(path), kv_cache_memory_gb=0.1, load_progress=False)
    native = LLMEngine(EngineConfig(**common))
    dense = LLMEngine(EngineConfig(dtype="float32", **common))
    return request.param, path, native, dense


def prompts_for(name, engine):
    raw, chats = MODELS[name]
    tok = engine.tokenizer
    chat_ids = [
        tok.encode(
            tok.apply_chat_template([{"role": "user", "content": c}]), add_special_tokens=False
        )
        for c in chats
    ]
    return chat_ids + [tok.encode(r) for r in raw]


def test_auto_keeps_blocks_and_dtype_forces_dense(engines):
    _, _, native, dense = engines
    assert native.dtype == torch.float32
    kinds = {type(m.method) for m in native.model.modules() if isinstance(m, Linear)}
    assert kinds == {GGUFWeights}, "EngineConfig(dtype='auto') must keep GGUF blocks on the CPU"
    assert {type(m.method) for m in dense.model.modules() if isinstance(m, Linear)} == {
        DenseWeights
    }


def test_weights_in_memory_are_the_file_size(engines):
    _, path, native, dense = engines
    size = path.stat().st_size
    nbytes = sum(p.numel() * p.element_size() for p in native.model.parameters())
    # the file also holds the tokenizer and metadata; norms are stored as F32 either way
    assert 0.85 * size < nbytes < 1.02 * size, (nbytes, size)
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.model.parameters())
    assert dense_bytes > 3.5 * nbytes


def test_greedy_agrees_with_dense(engines):
    from sagellm.runtime.params import SamplingParams

    name, _, native, dense = engines
    prompts = prompts_for(name, native)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    got, want = native.generate(prompts, params), dense.generate(prompts, params)
    agreed, diffs = 0, []
    for q, d in zip(got, want):
        first = next((i for i, (a, b) in enumerate(zip(q.token_ids, d.token_ids)) if a != b), None)
        for i in range(NEW_TOKENS if first is None else first + 1):  # same context up to here
            lq, ld = dict(q.logprobs[i].top), dict(d.logprobs[i].top)
            for t in set(lq) & set(ld):
                diffs.append(abs(lq[t] - ld[t]))
                if ld[t] > -3:
                    assert abs(lq[t] - ld[t]) <= LOGPROB_ATOL, (name, i, t, lq[t], ld[t])
        if first is not None:
            ld = dict(d.logprobs[first].top)
            gap = ld[d.token_ids[first]] - ld.get(q.token_ids[first], float("-inf"))
            assert gap <= CLOSE_CALL, f"{name}: parted at token {first} where dense led by {gap}"
        agreed += NEW_TOKENS if first is None else first
    assert agreed >= MIN_AGREED * NEW_TOKENS * len(prompts), agreed
    assert statistics.mean(diffs) <= LOGPROB_MEAN


def test_smollm2_answers_the_capital_question(smollm2_path):
    from sagellm.runtime.config import EngineConfig
    from sagellm.runtime.engine import LLMEngine
    from sagellm.runtime.params import SamplingParams

    engine = LLMEngine(EngineConfig(kv_cache_memory_gb=0.1, load_progress=False))
    assert isinstance(engine.model.model.embed_tokens.method, GGUFWeights)
    tok = engine.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "Tell me the capital of France."}])
    (out,) = engine.generate(
        [tok.encode(chat, add_special_tokens=False)], SamplingParams(max_tokens=16)
    )
    assert out.text.startswith("The capital of France is Paris.")
    assert out.finish_reason == "stop"


def test_info_names_the_kernel_of_each_weight_type():
    from sagellm.cli import info

    kernels = info.gguf_weights()
    assert kernels["Q4_1"] == f"gguf_linear {quant.gguf_kernel(Q4_1)}"
    assert kernels["Q6_K"].startswith("gguf_linear Q6_K x int8")
    assert kernels["F32"] == "dense" and kernels["Q2_K"] == "dense (dequantized at load)"
    text = info.render(info.collect())
    assert "Q4_K          gguf_linear Q4_K x int8" in text


def test_cuda_keeps_the_dense_path_without_a_cuda_kernel():
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("sagellm::gguf_linear", "CUDA")
    assert bool(gguf_native_types("cuda")) == has_cuda_kernel
    assert gguf_native_types("cpu") == frozenset(quant.GGUF_BLOCKS)
