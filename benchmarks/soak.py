"""Soak test: concurrent streaming clients, mid-stream cancels and bad requests; exit code 1 on
lost requests, KV blocks still held at the end, or unexpected errors.

    python benchmarks/soak.py --spawn-model default --clients 6 --duration-s 600 \\
        --cancel-share 0.2 --bad-share 0.1 --output soak.json
    python benchmarks/soak.py --url http://127.0.0.1:8000 --clients 4 --duration-s 120 \\
        --server-pid $(pgrep -f 'sage-llm serve')

The library is sagellm/bench/soak.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not

from sagellm.bench.soak import main as soak_main
from sagellm.gateway import GatewaySettings, create_app


def app_factory(manager, api_key: str | None):
    return create_app(manager, GatewaySettings(api_key=api_key, engine_routes=True))


def main(argv: list[str] | None = None) -> int:
    return soak_main(argv, app_factory=app_factory, prog="benchmarks/soak.py")


if __name__ == "__main__":
    sys.exit(main())
