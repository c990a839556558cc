"""The demo workloads of WORKLOADS.md: year1-3 (short / long / stress segments, with contracts)
and the Q1-Q8 suite, as data, plus the synthetic prompts they send.

Prompts are random words from a fixed list (seeded), tokenised by the served model's tokenizer
and cut to exactly the stated number of tokens, then sent as token ids so the length is exact.
Outputs are forced to their length with ignore_eos.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

SEED = 20260101


@dataclass(frozen=True)
class Segment:
    name: str
    prompt_tokens: int
    output_tokens: int
    requests: int
    concurrent: bool = False
    # Tokens of history every request of the segment shares (multi-turn chats): prefix cache hits.
    shared_prefix_tokens: int = 0

    def scaled(self, scale: float) -> Segment:
        def s(n: int, floor: int) -> int:
            return max(floor, round(n * scale))

        return Segment(
            self.name,
            s(self.prompt_tokens, 4),
            s(self.output_tokens, 2),
            s(self.requests, 1),
            self.concurrent,
            min(s(self.shared_prefix_tokens, 0), s(self.prompt_tokens, 4) - 1)
            if self.shared_prefix_tokens
            else 0,
        )


@dataclass(frozen=True)
class Contract:
    ttft_ms: float
    tbt_ms: float
    throughput_tps: float
    error_rate: float
    peak_mem_gb: float
    prefix_hit_rate: float | None = None
    spec_accept_rate: float | None = None


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    segments: tuple[Segment, ...]
    kv_budget_tokens: int | None = None
    contract: Contract | None = None

    def scaled(self, scale: float) -> Workload:
        if scale == 1:
            return self
        return Workload(
            self.name,
            self.description,
            tuple(s.scaled(scale) for s in self.segments),
            self.kv_budget_tokens,
            self.contract,
        )

    def to_dict(self) -> dict:
        out = {
            "name": self.name,
            "description": self.description,
            "segments": [asdict(s) for s in self.segments],
        }
        if self.kv_budget_tokens is not None:
            out["kv_budget_tokens"] = self.kv_budget_tokens
        return out


def _year(name, short, long, stress, budget, contract) -> Workload:
    return Workload(
        name,
        f"{name}: short and long prompts one after another, then the stress requests at once",
        (
            Segment("short", *short),
            Segment("long", *long),
            Segment("stress", *stress, concurrent=True),
        ),
        budget,
        contract,
    )


WORKLOADS: dict[str, Workload] = {
    "year1": _year(
        "year1",
        (128, 128, 5),
        (2048, 512, 3),
        (256, 256, 10),
        4096,
        Contract(100, 20, 50, 0.05, 32),
    ),
    "year2": _year(
        "year2",
        (256, 256, 10),
        (8192, 1024, 5),
        (512, 512, 50),
        16384,
        Contract(50, 10, 100, 0.02, 24, prefix_hit_rate=0.70),
    ),
    "year3": _year(
        "year3",
        (512, 512, 20),
        (32768, 2048, 10),
        (1024, 1024, 100),
        None,
        Contract(30, 5, 200, 0.01, 16, prefix_hit_rate=0.85, spec_accept_rate=0.60),
    ),
}

_Q = [
    ("q1", "short Q&A", 32, 64, 5, False, 0),
    ("q2", "long-context summarisation", 512, 128, 3, False, 0),
    ("q3", "code generation", 128, 256, 3, False, 0),
    (
        "q4",
        "multi-turn conversation (shared history -> prefix cache hits)",
        256,
        256,
        3,
        False,
        192,
    ),
    ("q5", "concurrent short", 32, 64, 10, True, 0),
    ("q6", "concurrent long context", 512, 256, 10, True, 0),
    ("q7", "chain-of-thought", 256, 512, 3, False, 0),
    ("q8", "composite", 192, 128, 4, True, 0),
]
for _id, _what, _p, _o, _n, _c, _shared in _Q:
    WORKLOADS[_id] = Workload(_id, _what, (Segment(_id, _p, _o, _n, _c, _shared),))

GROUPS = {
    "all": [*(f"year{i}" for i in (1, 2, 3)), *(q[0] for q in _Q)],
    "q": [q[0] for q in _Q],
}


def select(name: str) -> list[Workload]:
    """`year1`, `q3`, `Q3`, `all`, or a comma-separated list of them."""
    out: list[Workload] = []
    for part in name.lower().replace(" ", "").split(","):
        names = GROUPS.get(part, [part])
        for n in names:
            if n not in WORKLOADS:
                known = ", ".join([*WORKLOADS, *GROUPS])
                raise ValueError(f"workload = {part!r} is unknown; expected one of {known}")
            out.append(WORKLOADS[n])
    return out


_WORDS = (  # noqa: SIM905 (prose reads better than a list of 60 strings)
    "the model reads a long report about rivers mountains cities and trade then writes a short "
    "summary of each chapter with numbers dates names and places so that a reader who has no "
    "time can follow the story of how the valley grew from a village into a busy port over two "
    "hundred years of floods harvests markets roads bridges schools and songs"
).split()


class PromptFactory:
    """Token-id prompts of exact lengths: deterministic for a (seed, segment, index)."""

    def __init__(self, encode, seed: int = SEED):
        self.encode = encode  # str -> list[int], the served model's tokenizer, no special tokens
        self.seed = seed

    def text_tokens(self, n: int, rng: random.Random) -> list[int]:
        ids: list[int] = []
        while len(ids) < n:
            words = " ".join(rng.choice(_WORDS) for _ in range(max(16, n - len(ids))))
            ids.extend(self.encode(" " + words if ids else words.capitalize()))
        return ids[:n]

    def segment_prompts(self, workload: str, seg: Segment) -> list[list[int]]:
        rng = random.Random(f"{self.seed}/{workload}/{seg.name}")
        shared = self.text_tokens(seg.shared_prefix_tokens, rng) if seg.shared_prefix_tokens else []
        return [
            shared + self.text_tokens(seg.prompt_tokens - len(shared), rng)
            for _ in range(seg.requests)
        ]
