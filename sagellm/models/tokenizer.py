"""`Tokenizer`: a thin face over a Hugging Face fast tokenizer, built from a folder or a GGUF file."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sagellm.models.errors import ChatTemplateError, ModelLoadError

# Files whose presence means a folder ships a tokenizer (a test checkpoint written with
# save_pretrained alone has none).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class Tokenizer:
    """encode / decode / chat template over `hf`, with every end-of-sequence id in one set."""

    def __init__(self, hf: Any, extra_eos_token_ids: Iterable[int] = ()):
        self.hf = hf
        ids = set(extra_eos_token_ids)
        if hf.eos_token_id is not None:
            ids.add(int(hf.eos_token_id))
        self.eos_token_ids: set[int] = ids

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        extra_eos_token_ids: Iterable[int] = (),
        trust_remote_code: bool = False,
    ) -> Tokenizer | None:
        """The folder's tokenizer, or None when it ships no tokenizer files."""
        folder = Path(folder)
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            return None
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{folder}: cannot load the tokenizer ({e})") from e
        return cls(hf, extra_eos_token_ids)

    @classmethod
    def from_gguf(
        cls, path: str | Path, model_type: str, extra_eos_token_ids: Iterable[int] = ()
    ) -> Tokenizer:
        """The tokenizer stored in a GGUF file's metadata, the class AutoTokenizer would pick.

        AutoTokenizer itself first rebuilds the whole model config through gguf.GGUFReader only to
        choose the class, which costs seconds; the class depends only on `model_type`.
        """
        from transformers import TokenizersBackend
        from transformers.models.auto.tokenization_auto import (
            TOKENIZER_MAPPING_NAMES,
            tokenizer_class_from_name,
        )

        name = TOKENIZER_MAPPING_NAMES.get(model_type)
        klass = tokenizer_class_from_name(name) if name else None
        if klass is None or klass.__name__ in ("PythonBackend", "MistralCommonBackend"):
            klass = TokenizersBackend
        path = Path(path)
        try:
            hf = klass.from_pretrained(str(path.parent), gguf_file=path.name)
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(
                f"{path}: cannot build the tokenizer from GGUF metadata ({e})"
            ) from e
        return cls(hf, extra_eos_token_ids)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.hf.pad_token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included."""
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        return self.hf.convert_ids_to_tokens(ids)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt string for `messages` ([{"role": ..., "content": ...}, ...])."""
        if not self.has_chat_template:
            raise ChatTemplateError(
                f"the tokenizer of {self.hf.name_or_path or 'this model'} has no chat template; "
                "send the prompt as raw text instead"
            )
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
