"""Incremental detokenization: stream text as tokens arrive, never a broken character.

Each step decodes only a short window of recent tokens, ``ids[prefix_offset:]``, and emits what
it adds beyond the window's already-emitted head ``ids[prefix_offset:read_offset]``. Keeping
that head (one step of context) in the window makes decoders whose output for a token depends on
its neighbour (SentencePiece's leading-space strip, byte fallback) agree with a full decode.

A byte-level BPE token can carry part of a UTF-8 sequence; decoding it alone ends in U+FFFD.
While the window's text ends in U+FFFD the text is held back; a later token either completes the
character or proves the bytes invalid (then U+FFFD is really part of the text and is emitted
with what follows, or by :meth:`flush` at the end). Offsets only move to points where the text
ended in a complete character, so the UTF-8 decoder restarts there in the same state as in a
full decode, and the concatenated deltas equal ``tokenizer.decode(all_output_ids)``.

One exception, on garbage only: SentencePiece byte-fallback decoding (Llama 2, Mistral, Gemma)
turns *every* byte of an invalid run of ``<0x..>`` tokens into U+FFFD, so a byte already
streamed as valid ASCII can turn into U+FFFD in the full decode once an invalid byte follows it
in the same run. Valid UTF-8 is always exact, and byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM)
is exact even on invalid bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as context when use_prompt_context is on (as vLLM does).
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text deltas.

    tokenizer: a Hugging Face fast tokenizer, or a wrapper exposing one as ``.hf``.
    prompt_token_ids: the request's prompt; used only with ``use_prompt_context``.
    use_prompt_context: decode the output as the continuation of the prompt's last few tokens,
        so a SentencePiece tokenizer keeps the leading space of the first generated word (what a
        completion client appending text to its prompt wants). Off: the stream equals
        ``decode(output_ids)`` exactly, which strips that space, like transformers does.
    """

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        use_prompt_context: bool = False,
    ) -> None:
        self._tokenizer = getattr(tokenizer, "hf", tokenizer)
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]) if use_prompt_context else []
        self._num_context = len(context)
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(context) if context else ""
        self.output_text = ""  # everything emitted so far

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context :]

    def add_tokens(self, new_ids: Sequence[int]) -> str:
        """Append tokens; return the text they complete (possibly "")."""
        if not new_ids:
            return ""
        self._ids.extend(int(t) for t in new_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Text still held back (bytes that never formed a character); call when the sequence
        finishes. After it, ``output_text == decode(output_token_ids)``."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= len(self._prefix_text) or (not final and text.endswith(_REPLACEMENT)):
            return ""
        delta = text[len(self._prefix_text) :]
        # Move the window to start at the tokens emitted last step, unless they decode to nothing
        # on their own (skipped special tokens): then a context-sensitive first token would sit
        # in the delta part and be decoded differently than in the full text.
        new_prefix_text = self._decode(self._ids[self._read_offset :])
        if new_prefix_text or self._read_offset == 0:
            self._prefix_offset = self._read_offset
            self._prefix_text = new_prefix_text
        else:
            self._prefix_text = text
        self._read_offset = len(self._ids)
        self.output_text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
