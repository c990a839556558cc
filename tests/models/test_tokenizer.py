"""Tokenizer: the GGUF tokenizer equals transformers' AutoTokenizer on the same file."""

from __future__ import annotations

import json

import pytest

from sagellm.models import ChatTemplateError, Tokenizer, load_checkpoint

TEXTS = [
    "What is the capital of France?",
    "  leading spaces\tand tabs\n\nnewlines",
    "naïve café — 東京 🚀",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


@pytest.fixture(scope="module")
def pair(smollm2_path):
    from transformers import AutoTokenizer

    ours = Tokenizer.from_gguf(smollm2_path, "llama", {2})
    ref = AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    return ours, ref


def test_same_class_as_auto_tokenizer(pair):
    ours, ref = pair
    assert type(ours.hf) is type(ref)


@pytest.mark.parametrize("special", [True, False])
def test_encode_decode_equal(pair, special):
    ours, ref = pair
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=special)
        assert ids == ref.encode(text, add_special_tokens=special), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids)
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)


def test_chat_template_equal(pair):
    ours, ref = pair
    assert ours.has_chat_template
    for msgs in (CHAT[1:2], CHAT):
        expect = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(msgs) == expect
    assert ours.apply_chat_template(CHAT[1:2]).endswith("<|im_start|>assistant\n")


def test_special_ids(pair):
    ours, _ = pair
    assert ours.eos_token_ids == {2} and ours.convert_ids_to_tokens(2) == "<|im_end|>"
    assert ours.bos_token_id == 1 and ours.vocab_size == 49152


def test_load_checkpoint_tokenizer(smollm2_path):
    ck = load_checkpoint(str(smollm2_path), progress=False)
    assert ck.tokenizer.eos_token_ids == {2}
    assert ck.tokenizer.encode("Paris") == ck.tokenizer.hf.encode("Paris")


def _tiny_tokenizer_folder(tmp_path, chat_template=None):
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<eot>": 3, "hello": 4, "world": 5}
    backend = Backend(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template:
        hf.chat_template = chat_template
    hf.save_pretrained(tmp_path)
    return tmp_path


def test_folder_tokenizer_without_chat_template(tmp_path):
    tok = Tokenizer.from_folder(_tiny_tokenizer_folder(tmp_path), extra_eos_token_ids={3})
    assert tok.encode("hello world", add_special_tokens=False) == [4, 5]
    assert tok.decode([4, 5]) == "hello world" and tok.eos_token_ids == {2, 3}
    assert not tok.has_chat_template
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hello"}])


def test_generation_config_eos_joins(tmp_path):
    import torch
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=6,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        eos_token_id=2,
    )
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    _tiny_tokenizer_folder(
        tmp_path, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    ck = load_checkpoint(str(tmp_path), dtype=torch.float32, progress=False)
    assert ck.tokenizer.eos_token_ids == {2, 3}
    assert ck.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}]) == "hello"
