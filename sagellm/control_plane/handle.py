"""`EngineHandle`: what the control plane needs from an engine, wherever it runs.

In process (LocalEngine), behind HTTP (RemoteEngine), a server we spawn (SubprocessEngine), or a
plugin's own class: each answers the same few calls, so routing and health never care which.
"""

from __future__ import annotations

import abc
import enum
import itertools
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from sagellm.protocol import Request, StreamDelta, StreamEnd, StreamStart

StreamItem = StreamStart | StreamDelta | StreamEnd

_ids = itertools.count()


def default_engine_id(kind: str) -> str:
    return f"{kind}-{next(_ids)}"


class EngineState(str, enum.Enum):
    STARTING = "STARTING"
    READY = "READY"
    DOWN = "DOWN"
    STOPPED = "STOPPED"


@dataclass
class EngineLoad:
    """What routing reads. running/waiting: sequences in the engine's scheduler; kv_usage: share
    of KV blocks in use (0-1); in_flight: requests this handle has open."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    in_flight: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineLoad:
        return cls(
            running=int(data.get("running", 0)),
            waiting=int(data.get("waiting", 0)),
            kv_usage=float(data.get("kv_usage", 0.0)),
            in_flight=int(data.get("in_flight", 0)),
        )


class EngineHandle(abc.ABC):
    """One engine serving one model.

    generate() yields one StreamStart, then StreamDeltas, then one StreamEnd per choice (events
    carry `index`). A refused request raises ProtocolError before any event; closing the iterator
    early aborts the request; an engine that dies mid-request raises ProtocolError(UNAVAILABLE).
    """

    engine_id: str
    model: str
    state: EngineState = EngineState.STARTING
    kind: str = "custom"

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self, drain_timeout_s: float = 30) -> None: ...

    @abc.abstractmethod
    async def health(self) -> bool: ...

    @abc.abstractmethod
    def load(self) -> EngineLoad: ...

    @abc.abstractmethod
    def info(self) -> dict[str, Any]: ...

    def tokenizer(self):
        """The model's Tokenizer (for chat templates), or None when not available here."""
        return None

    @abc.abstractmethod
    def generate(self, request: Request) -> AsyncIterator[StreamItem]: ...

    async def restart(self) -> None:
        """Bring a DOWN engine back: by default stop what is left of it and start it again."""
        try:
            await self.stop(drain_timeout_s=0)
        finally:
            self.state = EngineState.STARTING
        await self.start()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.engine_id!r}, model={self.model!r}, {self.state.value})"
        )
