"""The OpenAI-compatible HTTP gateway (FastAPI + uvicorn) over a ControlPlaneManager.

app = create_app(manager, GatewaySettings(api_key="secret"))
serve_app(app, "127.0.0.1", 8000)
"""

from sagellm.gateway.app import GatewaySettings, create_app
from sagellm.gateway.server import make_server, serve_app

__all__ = ["GatewaySettings", "create_app", "make_server", "serve_app"]
