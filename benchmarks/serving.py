"""Open-loop serving benchmark (TTFT / TBT p50 and p99, throughput, errors) over streaming
/v1/completions.

    python benchmarks/serving.py --url http://127.0.0.1:8000 --rate 2 --num-requests 40
    python benchmarks/serving.py --spawn-model default --rate 1 --num-requests 32 \\
        --input-len 64-256 --output-len 32-128 --output serving.json

The same as `sage-llm bench serve`; the library is sagellm/bench/serving.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not

from sagellm.bench.serving import main as serving_main
from sagellm.gateway import GatewaySettings, create_app


def app_factory(manager, api_key: str | None):
    # engine_routes: the report then records /v1/engine/info (dtype, kernels, KV capacity).
    return create_app(manager, GatewaySettings(api_key=api_key, engine_routes=True))


def main(argv: list[str] | None = None) -> int:
    return serving_main(argv, app_factory=app_factory, prog="benchmarks/serving.py")


if __name__ == "__main__":
    sys.exit(main())
