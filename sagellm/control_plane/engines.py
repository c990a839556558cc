"""Engine handles and the engine plugins that make them.

A plugin is an entry point in the group `sagellm.engines` naming a callable
`factory(config: EngineConfig, backend: BackendConfig) -> EngineHandle`. The built-ins
(native, remote, subprocess) resolve even when the package metadata is not installed (a source
checkout on sys.path); an installed entry point of another name adds a kind, never replaces one.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from importlib.metadata import entry_points

from sagellm.control_plane.config import BackendConfig, EngineConfig
from sagellm.control_plane.handle import EngineHandle, EngineLoad, EngineState, StreamItem
from sagellm.control_plane.local_engine import LocalEngine
from sagellm.control_plane.remote_engine import RemoteEngine
from sagellm.control_plane.subprocess_engine import SubprocessEngine

log = logging.getLogger("sagellm.control_plane")

ENTRY_POINT_GROUP = "sagellm.engines"

BUILTIN_ENGINES: dict[str, str] = {
    "native": "sagellm.control_plane.engines:LocalEngine",
    "remote": "sagellm.control_plane.engines:RemoteEngine",
    "subprocess": "sagellm.control_plane.engines:SubprocessEngine",
}

EngineFactory = Callable[[EngineConfig, BackendConfig], EngineHandle]


def engine_plugins() -> dict[str, str]:
    """Every engine kind -> "module:attribute" of its factory (built-ins first)."""
    found = dict(BUILTIN_ENGINES)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def _load(target: str) -> EngineFactory:
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def engine_factory(kind: str) -> EngineFactory:
    plugins = engine_plugins()
    target = plugins.get(kind)
    if target is None:
        raise ValueError(
            f"engine kind = {kind!r} is unknown: installed engine plugins are "
            f"{', '.join(sorted(plugins))} (entry-point group {ENTRY_POINT_GROUP})"
        )
    try:
        return _load(target)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"engine plugin {kind!r} ({target}) cannot be loaded: {e}") from e


def create_engine(config: EngineConfig, backend: BackendConfig | None = None) -> EngineHandle:
    """The handle for one EngineConfig, made by the plugin its `kind` names (not started)."""
    handle = engine_factory(config.kind)(config, backend or BackendConfig())
    if not isinstance(handle, EngineHandle):
        raise TypeError(
            f"engine plugin {config.kind!r} returned {type(handle).__name__}, not an EngineHandle"
        )
    return handle


__all__ = [
    "BUILTIN_ENGINES",
    "ENTRY_POINT_GROUP",
    "EngineHandle",
    "EngineLoad",
    "EngineState",
    "LocalEngine",
    "RemoteEngine",
    "StreamItem",
    "SubprocessEngine",
    "create_engine",
    "engine_factory",
    "engine_plugins",
]
