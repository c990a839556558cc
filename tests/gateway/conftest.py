"""Real uvicorn servers on 127.0.0.1 (each in a thread with its own event loop) over a
ControlPlaneManager with a LocalEngine on a tiny random checkpoint."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sagellm.control_plane import ControlPlaneManager
from sagellm.control_plane.config import EngineConfig
from sagellm.gateway import GatewaySettings, create_app, make_server
from tests.tiny_models import load_reference_tokenizer, write_tiny_checkpoint

API_KEY = "test-key-123"
TINY = "tiny-llama"


@dataclass
class Served:
    url: str
    manager: ControlPlaneManager
    app: object
    checkpoint: Path | None

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def engine(self):
        return self.manager.engines()[0]


class ServerThread:
    """uvicorn on a socket bound here (port 0: no race for a free port), run in a thread."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = make_server(
            app, "127.0.0.1", self.port, log_level="warning", graceful_timeout_s=5
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self, timeout_s: float = 120.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def serve(manager, settings) -> tuple[ServerThread, str, object]:
    app = create_app(manager, settings)
    st = ServerThread(app)
    return st, st.start(), app


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gateway-tiny") / "tiny-llama"
    return write_tiny_checkpoint("llama", folder, load_reference_tokenizer())


def tiny_engine_config(checkpoint: Path, **kw) -> EngineConfig:
    return EngineConfig(
        model=str(checkpoint),
        model_name=TINY,
        max_num_seqs=16,
        kv_cache_memory_gb=0.05,
        num_threads=1,
        **kw,
    )


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    """The main server: API key on, a small body limit (so the 413 test sends little)."""
    manager = ControlPlaneManager(engine_configs=[tiny_engine_config(tiny_checkpoint)])
    settings = GatewaySettings(api_key=API_KEY, max_body_bytes=64 * 1024, drain_timeout_s=5)
    st, url, app = serve(manager, settings)
    yield Served(url, manager, app, tiny_checkpoint)
    st.stop()


@pytest.fixture
def http(server):
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    ) as c:
        yield c
