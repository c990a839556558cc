"""The engine with a quantized KV cache (--kv-cache-dtype int8 / fp8_e4m3) on the CPU: caches
really stored in one byte plus fp32 scales, capacity grown by the byte ratio, greedy output close
to the unquantized cache's, refusal of what cannot run, and the dtype reported."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sagellm.models.layers.attention import QuantizedKVCache
from sagellm.runtime.config import EngineConfig
from sagellm.runtime.model_runner import check_kv_cache_support
from sagellm.runtime.params import SamplingParams
from tests.runtime.test_engine import make_engine, tiny_llama

KV = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
PROMPTS = ["Hello there", "The capital of France is", "1, 2, 3,", "Once upon a time", "def f(x):"]
BUDGET_GB = 0.004  # small enough that max_num_seqs x max_model_len does not cap the block count


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    threads = torch.get_num_threads()
    yield tiny_llama(tmp_path_factory)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engines(ckpt):
    return {
        kv: make_engine(ckpt, kv_cache_memory_gb=BUDGET_GB, kv_cache_dtype=kv)
        for kv in ("auto", *KV)
    }


@pytest.mark.parametrize("kv", list(KV))
def test_caches_are_quantized_with_scales(engines, kv):
    eng = engines[kv]
    m = eng.model
    for layer in eng.runner.kv_caches:
        assert isinstance(layer, QuantizedKVCache)
        assert layer.data.dtype == KV[kv]
        assert layer.data.shape == (2, eng.num_blocks, 16, m.num_kv_heads, m.head_size)
        assert layer.scales.dtype == torch.float32
        assert layer.scales.shape == layer.data.shape[:-1]


@pytest.mark.parametrize("kv", list(KV))
def test_capacity_grows_by_the_byte_ratio(engines, kv):
    # fp32 stores 4 bytes per element; int8/fp8 1 byte plus a 4-byte scale per head_size (64)
    # elements: (4 * 64) / (64 + 4) = 3.76x the tokens in the same budget.
    fp, q = engines["auto"], engines[kv]
    m = q.model
    per_token = 2 * m.num_layers * m.num_kv_heads * (m.head_size + 4)
    budget = int(BUDGET_GB * 2**30)
    assert q.num_blocks == budget // (per_token * 16)
    assert q.runner.kv_cache_bytes() == q.num_blocks * 16 * per_token <= budget
    ratio = q.num_blocks / fp.num_blocks
    assert ratio == pytest.approx(4 * m.head_size / (m.head_size + 4), rel=0.01)
    assert q.kv_capacity_tokens == q.num_blocks * 16


@pytest.mark.parametrize("kv", list(KV))
def test_greedy_output_close_to_the_fp_cache(engines, kv):
    # A random 2-layer model has many near-ties, so exact agreement over long runs is not a fair
    # demand; measured with this checkpoint: common greedy prefixes of [16, 8, 16, 1, 7] (int8)
    # and [16, 4, 16, 4, 7] (fp8) tokens out of 16. Required: the first token on every prompt
    # (prefill attends over the freshly quantized cache) and a mean common prefix of >= 4.
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    want = [o.token_ids for o in engines["auto"].generate(PROMPTS, params)]
    got = [o.token_ids for o in engines[kv].generate(PROMPTS, params)]
    common = []
    for a, b in zip(want, got, strict=True):
        n = 0
        while n < len(a) and a[n] == b[n]:
            n += 1
        common.append(n)
    assert all(n >= 1 for n in common), common
    assert sum(common) / len(common) >= 4, common


def test_reports_kv_dtype_and_kernel(engines):
    s = engines["int8"].stats()
    assert s["kv_cache_dtype"] == "int8"
    assert s["attention_kernel"].startswith("cpu-") and "int8 KV" in s["attention_kernel"]
    assert engines["auto"].stats()["kv_cache_dtype"] == "float32"
    assert engines["fp8_e4m3"].stats()["kv_cache_dtype"] == "fp8_e4m3"


@pytest.mark.parametrize("bad", ["fp16", "fp8", "INT8", ""])
def test_invalid_kv_cache_dtype_refused(bad):
    with pytest.raises(ValueError, match=f"kv_cache_dtype = {bad!r} is invalid"):
        EngineConfig(kv_cache_dtype=bad)


@pytest.mark.parametrize("kv", [torch.int8, torch.float8_e4m3fn, torch.float32])
def test_unsupported_head_size_refused_at_start(kv):
    # What the kernels lack is refused up front with their reason, never run some other way.
    model = SimpleNamespace(dtype=torch.float32, num_kv_heads=2, head_size=72)
    with pytest.raises(ValueError, match="cannot run here .*head_size 72 is not supported"):
        check_kv_cache_support(model, kv, torch.device("cpu"))
