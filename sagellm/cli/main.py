"""`sage-llm`: the command-line face of sageLLM. Each subcommand imports its code lazily, so
`sage-llm --help` stays fast."""

from __future__ import annotations

import argparse
import sys


def _gateway_app(manager, api_key):
    from sagellm.gateway import GatewaySettings, create_app

    return create_app(manager, GatewaySettings(api_key=api_key, engine_routes=True))


def build_parser() -> argparse.ArgumentParser:
    from sagellm import __version__

    parser = argparse.ArgumentParser(
        prog="sage-llm",
        description="sageLLM: LLM inference on CPUs and GPUs, with an OpenAI-compatible server.",
    )
    parser.add_argument("--version", action="version", version=f"sageLLM {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from sagellm.cli import info, run

    info.add_arguments(
        sub.add_parser("info", help="hardware, torch build and what the native extension contains")
    )
    run.add_arguments(sub.add_parser("run", help="answer one prompt in process (no server)"))
    from sagellm.cli import config_cmd, demo, install, serve

    serve.add_serve_arguments(
        sub.add_parser(
            "serve",
            help="OpenAI-compatible server with one engine (--engine-only: for a gateway)",
            description="Serve a model over the OpenAI API: /v1/chat/completions, "
            "/v1/completions, /v1/models, /health, /metrics. Settings: config file < SAGELLM_* "
            "environment < flags (`sage-llm config show`).",
        )
    )
    serve.add_gateway_arguments(
        sub.add_parser(
            "gateway",
            help="OpenAI-compatible gateway routing to engine-only servers",
            description="Route OpenAI requests to `sage-llm serve --engine-only` servers.",
        )
    )
    demo.add_arguments(
        sub.add_parser(
            "demo",
            help="run the year1-3 / Q1-Q8 workloads and write their metrics JSON",
            description=demo.__doc__,
        )
    )
    install.add_arguments(
        sub.add_parser(
            "install",
            help="install torch for cpu/cuda/ascend/... and rebuild sageLLM against it",
            description=install.__doc__,
        )
    )
    config_cmd.add_arguments(
        sub.add_parser("config", help="show the settings, the config path, or write a template")
    )
    from sagellm.bench import cli as bench_cli

    bench = sub.add_parser("bench", help="benchmarks: `sage-llm bench op|throughput|serve|soak …`")
    bench_cli.add_arguments(bench)
    bench.set_defaults(app_factory=_gateway_app)  # for `bench serve|soak --spawn-model`
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
