"""Control plane: engines (in process, remote, spawned, plugins) behind one request API, with
routing policies, health checks and restarts. `ControlPlaneManager` is the entry point."""

from sagellm.control_plane.config import BackendConfig, EngineConfig
from sagellm.control_plane.engines import (
    EngineHandle,
    EngineLoad,
    EngineState,
    LocalEngine,
    RemoteEngine,
    SubprocessEngine,
    create_engine,
    engine_plugins,
)
from sagellm.control_plane.manager import ControlPlaneManager
from sagellm.control_plane.routing import POLICIES, make_policy

__all__ = [
    "POLICIES",
    "BackendConfig",
    "ControlPlaneManager",
    "EngineConfig",
    "EngineHandle",
    "EngineLoad",
    "EngineState",
    "LocalEngine",
    "RemoteEngine",
    "SubprocessEngine",
    "create_engine",
    "engine_plugins",
    "make_policy",
]
