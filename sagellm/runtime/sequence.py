"""One generation stream: its tokens, its KV blocks, its progress and its timings."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from sagellm.runtime.params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SequenceTimes:
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished: float | None = None
    preempted_at: float | None = None
    evict_count: int = 0
    evict_s: float = 0.0


class Sequence:
    """Prompt and output tokens of one request (one of its `n` choices)."""

    def __init__(
        self,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        arrival: float | None = None,
        priority: int = 0,
        generator: torch.Generator | None = None,
    ):
        self.request_id, self.index = request_id, index
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params, self.priority, self.generator = params, priority, generator
        self.status = SequenceStatus.WAITING
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # content hashes of the full, computed blocks
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_prompt_tokens = 0  # prompt tokens served by the prefix cache
        self.peak_blocks = 0
        self.finish_reason: str | None = None
        self.times = SequenceTimes(arrival=arrival if arrival is not None else time.monotonic())
        # Filled by the engine: incremental detokenizer, stop checker, emitted text.
        self.detok = None
        self.stop = None
        self.text = ""
        self.emitted_chars = 0

    @property
    def seq_id(self) -> str:
        return f"{self.request_id}#{self.index}"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.seq_id}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})"
        )
