"""`serve_app`: run a gateway app under uvicorn until SIGINT/SIGTERM, then shut down gracefully.

On a signal uvicorn stops accepting connections and waits up to `graceful_timeout_s` for open
ones (streams included) to finish; then the app's lifespan drains what is left and stops the
control plane.
"""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI


def make_server(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "info",
    graceful_timeout_s: float = 30.0,
    access_log: bool = False,
) -> uvicorn.Server:
    """A configured uvicorn.Server (call `.run()`, or set `.should_exit` to stop it)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=graceful_timeout_s,
        # Requests are bounded by the app (max_body_bytes); keep-alive helps streaming clients.
        timeout_keep_alive=30,
        lifespan="on",
    )
    return uvicorn.Server(config)


def serve_app(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "info",
    graceful_timeout_s: float = 30.0,
    access_log: bool = False,
) -> None:
    """Serve `app` on host:port until interrupted. Raises SystemExit(1) when startup fails
    (for instance the port is taken, or the manager cannot load its engines)."""
    server = make_server(
        app,
        host,
        port,
        log_level=log_level,
        graceful_timeout_s=graceful_timeout_s,
        access_log=access_log,
    )
    server.run()
    if not server.started:
        raise SystemExit(1)
