"""Routing policies: which READY engine of a model gets the next request.

- round_robin: take turns, per model.
- least_loaded: fewest open requests, then fewest waiting, then lowest KV usage.
- prefix_affinity: the same prompt prefix (first 256 characters / 64 token ids) goes to the same
  engine while that engine is READY, so its prefix cache is hit; a new prefix goes to the least
  loaded engine and is remembered.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Sequence

from sagellm.control_plane.handle import EngineHandle
from sagellm.protocol import Request

PREFIX_CHARS = 256
PREFIX_TOKENS = 64


class RoutingPolicy:
    name = ""

    def choose(self, engines: Sequence[EngineHandle], request: Request) -> EngineHandle:
        """One of `engines` (non-empty, all READY and serving request.model)."""
        raise NotImplementedError


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._turns: dict[str, itertools.count] = {}

    def choose(self, engines, request):
        turn = self._turns.setdefault(request.model, itertools.count())
        return engines[next(turn) % len(engines)]


class LeastLoaded(RoutingPolicy):
    name = "least_loaded"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, engines, request):
        # Ties (idle engines) rotate, so a quiet server still spreads its requests.
        start = next(self._turn) % len(engines)
        rotated = list(engines[start:]) + list(engines[:start])
        return min(rotated, key=_load_key)


def _load_key(engine: EngineHandle) -> tuple[int, int, float]:
    load = engine.load()
    return (load.in_flight, load.waiting, load.kv_usage)


def prefix_key(prompt: str | Sequence[int]) -> str:
    if isinstance(prompt, str):
        data = prompt[:PREFIX_CHARS].encode("utf-8", "surrogatepass")
    else:
        data = ",".join(str(t) for t in prompt[:PREFIX_TOKENS]).encode()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class PrefixAffinity(RoutingPolicy):
    name = "prefix_affinity"

    def __init__(self, max_entries: int = 65536) -> None:
        self._owner: OrderedDict[tuple[str, str], str] = OrderedDict()  # (model, key) -> engine
        self._fallback = LeastLoaded()
        self.max_entries = max_entries

    def choose(self, engines, request):
        key = (request.model, prefix_key(request.prompt))
        owner = self._owner.get(key)
        if owner is not None:
            for engine in engines:
                if engine.engine_id == owner:
                    self._owner.move_to_end(key)
                    return engine
        engine = self._fallback.choose(engines, request)
        self._owner[key] = engine.engine_id
        self._owner.move_to_end(key)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)
        return engine


POLICIES: dict[str, type[RoutingPolicy]] = {
    p.name: p for p in (RoundRobin, LeastLoaded, PrefixAffinity)
}


def make_policy(policy: str | RoutingPolicy) -> RoutingPolicy:
    if isinstance(policy, RoutingPolicy):
        return policy
    cls = POLICIES.get(policy)
    if cls is None:
        raise ValueError(f"routing = {policy!r} is unknown: expected {', '.join(POLICIES)}")
    return cls()
