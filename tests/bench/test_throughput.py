"""`sage-llm bench throughput` end to end on a tiny random checkpoint written through the shapes
mechanism: both backends measure the same workload, the JSON holds only measured figures, and
bad arguments end with an argparse error. Speed is never asserted (the machine is shared).
"""

from __future__ import annotations

import json

import pytest
import torch

from sagellm.bench import shapes, throughput
from sagellm.bench.cli import main as bench_main
from sagellm.models.errors import ModelNotFoundError

# head size 64: the smallest the attention kernels are compiled for.
TINY = shapes.Shape("tiny-test", "llama", 2, 128, 2, 1, 256, 49152, True, 10_000.0, 512)
TINY_QWEN = shapes.Shape("tiny-qwen-test", "qwen2", 1, 128, 2, 1, 192, 50000, False, 1e6, 256)


def _has_default_model() -> bool:
    try:
        from sagellm.models.default_model import default_model_path

        default_model_path()
    except ModelNotFoundError:
        return False
    return True


needs_tokenizer = pytest.mark.skipif(
    not _has_default_model(), reason="shape checkpoints copy the default model's tokenizer"
)


@pytest.fixture
def tiny_shape(monkeypatch, tmp_path_factory):
    """TINY registered as a --shape, its cache under a temporary XDG_CACHE_HOME."""
    monkeypatch.setitem(shapes.SHAPES, TINY.name, TINY)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg"))
    return TINY


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


@needs_tokenizer
def test_tiny_run_measures_both_backends(tiny_shape, tmp_path, capsys):
    out = tmp_path / "tput.json"
    argv = [
        "--shape", TINY.name, "--num-prompts", "3", "--input-len", "4-20", "--output-len", "2-6",
        "--batch-1", "--batch-1-input-len", "8", "--batch-1-output-len", "6",
        "--backends", "sagellm,transformers", "--hf-batch-size", "2", "--threads", "1",
        "--device", "cpu", "--copy-mib", "8", "--output", str(out),
    ]  # fmt: skip
    assert throughput.main(argv) == 0
    result = json.loads(out.read_text())

    work = throughput.make_workload(
        throughput.prompt_token_ids(_tokenizer(result), 49152), 3, (4, 20), (2, 6), 0, 8, 6
    )
    assert result["workload"]["prompt_tokens"] == work.prompt_tokens
    assert result["workload"]["output_tokens"] == work.output_tokens
    assert result["parameters"]["shape"] == TINY.name
    assert result["parameters"]["dtype"] == "float32"
    for name in ("sagellm", "transformers"):
        backend = result["backends"][name]
        assert _positive(backend["load_time_s"])
        assert backend["weight_bytes"] == TINY.num_parameters() * 4
        batch = backend["batch"]
        assert batch["output_tokens"] == work.output_tokens
        assert batch["prompt_tokens"] == work.prompt_tokens
        for key in ("wall_s", "output_tok_s", "total_tok_s"):
            assert _positive(batch[key]), (name, key)
        assert batch["total_tok_s"] > batch["output_tok_s"]
        b1 = backend["batch_1"]
        assert b1["output_tokens"] == 6
        for key in ("ttft_ms", "decode_tok_s", "e2e_tok_s", "roofline_tok_s"):
            assert _positive(b1[key]), (name, key)
    # transformers ran 2 batches, each padded to its longest output.
    hf = result["backends"]["transformers"]["batch"]
    lens = sorted(work.output_lens)
    assert hf["generated_tokens_with_padding"] == 2 * lens[1] + lens[2]
    ratio = result["ratios_vs_transformers"]["sagellm"]
    assert _positive(ratio["output_tok_s"]) and _positive(ratio["batch_1_decode_tok_s"])
    assert any("sorted by output length" in note for note in result["notes"])
    assert _positive(result["context"]["copy_bw_gb_s"]) and "load_avg_1m" in result["context"]

    for name in ("sagellm", "transformers"):
        b1 = result["backends"][name]["batch_1"]
        assert b1["fraction_of_roofline"] == pytest.approx(
            b1["decode_tok_s"] / b1["roofline_tok_s"]
        )
    assert result["backends"]["sagellm"]["stats"]["max_num_seqs"] == 64

    table = capsys.readouterr().out
    assert "sagellm" in table and "transformers" in table and "x HF out" in table
    assert "of roofline" in table.splitlines()[-4]  # the table comes last


def _tokenizer(result):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(result["parameters"]["model"])


@needs_tokenizer
def test_sage_llm_bench_throughput_runs_the_same_command(tiny_shape, tmp_path):
    out = tmp_path / "tput.json"
    argv = [
        "throughput", "--shape", TINY.name, "--num-prompts", "2", "--input-len", "5",
        "--output-len", "3", "--backends", "sagellm", "--device", "cpu", "--copy-mib", "8",
        "--enforce-eager", "--output", str(out),
    ]  # fmt: skip
    assert bench_main(argv) == 0
    result = json.loads(out.read_text())
    assert list(result["backends"]) == ["sagellm"]
    assert result["parameters"]["enforce_eager"] is True
    # Not measured, so absent: no transformers run, no ratio, no batch-1 figures.
    assert result["ratios_vs_transformers"] == {} and result["notes"] == []
    assert "batch_1" not in result["backends"]["sagellm"]
    assert result["backends"]["sagellm"]["batch"]["output_tokens"] == 6


def test_workload_is_fixed_by_the_seed():
    ids = list(range(10, 500))
    first = throughput.make_workload(ids, 20, (3, 40), (1, 9), seed=7)
    again = throughput.make_workload(ids, 20, (3, 40), (1, 9), seed=7)
    other = throughput.make_workload(ids, 20, (3, 40), (1, 9), seed=8)
    assert first == again and first.prompts != other.prompts
    assert all(3 <= len(p) <= 40 for p in first.prompts)
    assert all(1 <= n <= 9 for n in first.output_lens)
    assert all(10 <= t < 500 for p in first.prompts for t in p)
    assert len(first.batch1_prompt) == 32 and first.batch1_output_len == 128


def test_prompt_ids_skip_special_tokens_and_respect_both_vocabularies():
    class Tok:
        all_special_ids = [0, 2]

        def __len__(self):
            return 10

    assert throughput.prompt_token_ids(Tok(), 8) == [1, 3, 4, 5, 6, 7]
    assert throughput.prompt_token_ids(Tok(), 100) == [1, 3, 4, 5, 6, 7, 8, 9]


@needs_tokenizer
def test_shape_folder_is_reused_and_rewritten_when_the_shape_changes(tmp_path):
    folder = shapes.checkpoint_folder(TINY_QWEN, torch.bfloat16, root=tmp_path)
    assert folder.name == "tiny-qwen-test-bfloat16"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["vocab_size"] == 50000
    assert config["tie_word_embeddings"] is False
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert shapes.checkpoint_folder(TINY_QWEN, torch.bfloat16, root=tmp_path) == folder
    assert weights.stat().st_mtime_ns == stamp

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == TINY_QWEN.num_parameters()
    assert model.dtype == torch.bfloat16

    wider = shapes.Shape(**{**TINY_QWEN.__dict__, "intermediate_size": 256})
    assert shapes.checkpoint_folder(wider, torch.bfloat16, root=tmp_path) == folder
    config = json.loads((folder / "config.json").read_text())
    assert config["intermediate_size"] == 256
    assert not list(tmp_path.glob("*.tmp-*"))


def test_named_shapes_have_the_published_sizes():
    assert round(shapes.SHAPES["llama3-8b"].num_parameters() / 1e9, 2) == 8.03
    assert round(shapes.SHAPES["qwen2.5-0.5b"].num_parameters() / 1e9, 3) == 0.494
    assert round(shapes.SHAPES["smollm2-135m"].num_parameters() / 1e6) == 135
    with pytest.raises(ValueError, match="shape = 'gpt5'"):
        shapes.get_shape("gpt5")
    with pytest.raises(ValueError, match="model_type"):
        shapes.Shape("x", "mamba", 1, 64, 1, 1, 64, 100, True, 1e4, 64)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--input-len", "10-5"], "need 1 <= MIN <= MAX"),
        (["--output-len", "abc"], "is not N or MIN-MAX"),
        (["--num-prompts", "0"], "must be at least 1"),
        (["--backends", "sagellm,vllm"], "unknown backend 'vllm'"),
        (["--backends", "sagellm,sagellm"], "listed twice"),
        (["--shape", "gpt5"], "shape = 'gpt5' is unknown"),
        (["--dtype", "int3"], "unknown dtype 'int3'"),
        (["--model", "x", "--shape", "llama3-8b"], "not allowed with argument"),
        (["--batch-1-output-len", "1"], "decode needs at least 2"),
        (["--kv-cache-gb", "-1"], "must be > 0"),
        (["--model", "/nonexistent/model", "--device", "cpu"], "not found"),
    ],
)
def test_bad_arguments_exit_2_without_traceback(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        throughput.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_llamacpp_needs_the_module_and_a_gguf(monkeypatch, capsys):
    monkeypatch.setattr(throughput, "llamacpp_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        throughput.main(["--backends", "llamacpp"])
    assert exc.value.code == 2 and "llama_cpp module does not import" in capsys.readouterr().err
    monkeypatch.setattr(throughput, "llamacpp_available", lambda: True)
    with pytest.raises(SystemExit) as exc:
        throughput.main(["--backends", "llamacpp", "--shape", "llama3-8b"])
    assert exc.value.code == 2 and "needs a GGUF model" in capsys.readouterr().err


def test_weight_bytes_skip_an_untied_input_embedding_in_both_engines():
    """The roofline counts what one decode step reads: the LM head whole, one embedding row."""
    from transformers import AutoModelForCausalLM

    from sagellm.bench.throughput_backends import weight_bytes
    from sagellm.models.config import ModelConfig
    from sagellm.models.registry import build_model

    hf_config = shapes.transformers_config(TINY_QWEN, 1, 2)
    embed = TINY_QWEN.vocab_size * TINY_QWEN.hidden_size * 4
    total = TINY_QWEN.num_parameters() * 4
    hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    assert weight_bytes(hf, tied=False) == total - embed
    ours = build_model(ModelConfig.from_hf_dict(hf_config.to_dict()), torch.float32, "cpu")
    assert weight_bytes(ours, tied=False) == total - embed
    assert weight_bytes(ours, tied=True) == total
