"""`sage-llm bench quality` on a tiny random checkpoint: every row is scored through the engine,
each scored position exactly once; a quantization that is wrong (int8 scales doubled) goes over
its perplexity budget and makes the exit status 1, so the check can fail.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from sagellm.bench import quality
from sagellm.bench.cli import main as bench_main
from sagellm.models.errors import ModelNotFoundError
from sagellm.ops import quant as quant_ops


def _has_default_model() -> bool:
    try:
        from sagellm.models.default_model import default_model_path

        default_model_path()
    except ModelNotFoundError:
        return False
    return True


def _has_int8() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("sagellm::int8_linear", "CPU")


pytestmark = pytest.mark.skipif(
    not _has_default_model(), reason="the tiny checkpoint uses the default model's tokenizer"
)
needs_int8 = pytest.mark.skipif(not _has_int8(), reason="no CPU int8_linear in this build")

# 3 windows of 64 tokens, prefilled in chunks of 32: 3 * 63 positions scored.
ARGS = ["--max-tokens", "192", "--window", "64", "--chunk", "32", "--gen-tokens", "4"]
ARGS += ["--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_models import load_reference_tokenizer, write_tiny_checkpoint

    return write_tiny_checkpoint(
        "llama", tmp_path_factory.mktemp("q") / "llama", load_reference_tokenizer()
    )


def _run(tiny, tmp_path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "quality.json"
    status = quality.main(["--model", str(tiny), *ARGS, "--output", str(out), *extra])
    return status, json.loads(out.read_text())


@needs_int8
def test_rows_are_scored_through_the_engine(tiny, tmp_path, capsys):
    status, result = _run(
        tiny, tmp_path, "--formats", "dense,file,int8,Q8_0", "--kv-dtypes", "auto"
    )
    rows = {r["format"]: r for r in result["records"]}
    assert list(rows) == ["dense", "int8", "Q8_0"]
    for r in rows.values():
        assert "error" not in r, r
        assert r["scored_tokens"] == 3 * 63
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert r["perplexity"] == pytest.approx(math.exp(r["nll_per_token"]))
        assert len(r["greedy"]) == len(quality.PROMPTS)  # answers end at EOS or 4 tokens
        assert all(1 <= len(g) <= 4 for g in r["greedy"])
    dense = rows["dense"]
    for name in ("int8", "Q8_0"):
        r = rows[name]
        assert r["weight_bytes"] < dense["weight_bytes"]
        assert r["ppl_increase_pct"] == pytest.approx(
            100 * (r["perplexity"] / dense["perplexity"] - 1)
        )
        assert r["budget_pct"] == quality.BUDGETS[name] and r["within_budget"]
        assert 0 <= r["greedy_agreement"] <= 1
    assert status == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and "int8" in table and "OVER BUDGET" not in table
    assert result["notes"] == ["skipped file: the model is not a GGUF file"]  # noted, not run


@needs_int8
def test_broken_quantization_exceeds_its_budget(tiny, tmp_path, monkeypatch, capsys):
    real = quant_ops.quantize_int8

    def doubled(w):
        q, s = real(w)
        return q, s * 2

    monkeypatch.setattr(quant_ops, "quantize_int8", doubled)
    status, result = _run(tiny, tmp_path, "--formats", "dense,int8", "--kv-dtypes", "auto")
    row = result["records"][1]
    assert row["format"] == "int8" and row["within_budget"] is False
    assert abs(row["ppl_increase_pct"]) > quality.BUDGETS["int8"]  # -4.9% measured
    assert status == 1
    assert "OVER BUDGET" in capsys.readouterr().out


def test_kv_cache_dtypes_are_rows(tiny, tmp_path):
    status, result = _run(tiny, tmp_path, "--formats", "dense", "--kv-dtypes", "auto,int8")
    rows = {r["format"]: r for r in result["records"]}
    assert list(rows) == ["dense", "kv int8"]
    kv = rows["kv int8"]
    assert "error" not in kv, kv
    assert kv["scored_tokens"] == 3 * 63 and kv["within_budget"], kv
    assert status == 0


def test_text_windows_and_agreement():
    text = quality.read_text(quality.TEXT)
    assert not text.startswith("#") and text.startswith("Objects, values and types")
    assert "Python Software Foundation" in quality.TEXT.read_text().split("# ---")[0]
    assert quality.windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert quality.windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # [8] scores nothing
    assert quality.agreement([[1, 2, 3, 4], [1, 9, 3, 4]], [[1, 2, 3, 4], [1, 2, 3, 4]]) == 0.625


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench_main(["quality", "--formats", "int3"])
    assert "unknown format 'int3'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_main(["quality", "--kv-dtypes", "fp16"])
    assert "unknown KV dtype 'fp16'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_main(["quality", "--window", "0"])
    with pytest.raises(SystemExit):
        bench_main(["quality", "--budget", "int9=3"])
    assert "ROW=PERCENT" in capsys.readouterr().err
    args = quality.build_parser().parse_args(["--budget", "int4=10", "--budget", "kv int8=0.5"])
    assert dict(args.budget) == {"int4": 10.0, "kv int8": 0.5}
