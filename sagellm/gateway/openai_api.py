"""OpenAI request bodies (completions and chat) and their mapping to a protocol Request.

Bodies are validated strictly (a string is not a number, a float is not an integer) with the
ranges of the protocol, so a bad field is a 400 that names it. Fields OpenAI clients send that
change nothing here (`user`, `store`, ...) are accepted and ignored; fields whose meaning we do
not implement (tools, JSON mode, echo, suffix, batched prompts) are refused rather than ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sagellm.gateway.errors import GatewayError
from sagellm.protocol import ErrorCode, Request

# Completions without max_tokens generate this many, as OpenAI's API does.
DEFAULT_COMPLETION_MAX_TOKENS = 16

NonNegInt = Annotated[int, Field(ge=0)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints (OpenAI names, plus the vLLM-style extras)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = Field(default=None, min_length=1)
    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(default=None)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # extras (vLLM names)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    ignore_eos: bool = False
    stop_token_ids: list[NonNegInt] | None = None
    priority: int = 0
    kv_budget_tokens: int | None = Field(default=None, gt=0)
    # refused when set: their effect is not implemented
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _refuse_unimplemented(self):
        if isinstance(self.stop, str) and not self.stop:
            raise ValueError("stop must be a non-empty string or a list of them")
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise ValueError(f"stop has {len(self.stop)} strings; at most 16 are allowed")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported; use n")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def to_request(
        self,
        *,
        model: str,
        prompt: str | list[int],
        max_tokens: int,
        logprobs: int | None,
        request_id: str,
        trace_id: str,
    ) -> Request:
        return Request(
            request_id=request_id,
            trace_id=trace_id,
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            stream=self.stream,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            stop=self.stop_list(),
            stop_token_ids=self.stop_token_ids,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            n=self.n,
            kv_budget_tokens=self.kv_budget_tokens,
            priority=self.priority,
        )


class CompletionRequest(_Sampling):
    prompt: str | list[NonNegInt] | list[str] | list[list[NonNegInt]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _single_prompt(self):
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValueError(
                    f"prompt holds {len(p)} prompts; send one request per prompt "
                    "(batched prompts are not supported)"
                )
            self.prompt = p[0]
        if isinstance(self.prompt, str) and not self.prompt or self.prompt == []:
            raise ValueError("prompt is empty")
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # Chat templates written before the "developer" role know it as "system".
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _refuse_unimplemented_chat(self):
        if self.tools or self.functions:
            raise ValueError("tools and function calling are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format other than {'type': 'text'} is not supported")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs = true")
        return self

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def resolve_max_tokens(asked: int | None, default: int, prompt_len: int, max_model_len: int | None):
    """`asked`, or `default` clipped to the room the context leaves (at least 1, so that a prompt
    already at the limit still gets the engine's CONTEXT_LENGTH_EXCEEDED message)."""
    if asked is not None:
        return asked
    if max_model_len is None:
        return default
    return max(1, min(default, max_model_len - prompt_len))


def resolve_model(asked: str | None, served: list[str]) -> str:
    """The model a request names; with one served model it may be left out."""
    if asked is not None:
        return asked
    if len(served) == 1:
        return served[0]
    raise GatewayError(
        ErrorCode.INVALID_ARGUMENT,
        f"model is required: this server serves {len(served)} models ({', '.join(served)})",
        param="model",
    )
