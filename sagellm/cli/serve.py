"""`sage-llm serve` (gateway + one in-process engine; `--engine-only` adds the /v1/engine/* routes
a gateway talks to) and `sage-llm gateway` (in front of engine-only servers).

Both load the settings (config file < SAGELLM_* < flags), start the control plane before the
HTTP server so a missing model or a bad flag is one line and a non-zero exit, then serve until
SIGINT/SIGTERM, when uvicorn drains in-flight requests and the engines stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading

# flag -> settings key, for the flags both commands share with the config file
_SERVE_FLAGS = (
    "model",
    "model_name",
    "engine_id",
    "engine_kind",
    "backend",
    "device",
    "host",
    "port",
    "api_key",
    "dtype",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "kv_cache_memory_gb",
    "kv_cache_dtype",
    "quantization",
    "tensor_parallel_size",
    "num_threads",
    "max_concurrent",
    "max_queue",
    "request_timeout_s",
)


class StartupError(Exception):
    """Why the server could not start, in one line."""


def _common(p, default_port: int) -> None:
    p.add_argument(
        "--host",
        default=None,
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every "
        "interface — set --api-key then)",
    )
    p.add_argument("--port", type=int, default=None, help=f"TCP port (default {default_port})")
    p.add_argument(
        "--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/* requests"
    )
    p.add_argument("--max-concurrent", type=int, default=None, help="requests run at once (64)")
    p.add_argument("--max-queue", type=int, default=None, help="requests waiting, then 503 (256)")
    p.add_argument("--request-timeout-s", type=float, default=None, help="per request (600)")
    p.add_argument("--log-level", default="warning", help="uvicorn/sageLLM log level (warning)")


def add_serve_arguments(p) -> None:
    p.add_argument(
        "-m", "--model", default=None, help="local dir, .gguf file or HF id (default: SmolLM2-135M)"
    )
    p.add_argument("--model-name", default=None, help="the name clients send (default: derived)")
    p.add_argument("--engine-id", default=None, help="this engine's id in /health and metrics")
    p.add_argument(
        "--engine-only",
        action="store_true",
        help="also serve /v1/engine/* so a `sage-llm gateway` can route to this engine",
    )
    p.add_argument(
        "--engine-kind", default=None, help="engine plugin (sagellm.engines; default native)"
    )
    p.add_argument(
        "--backend", default=None, help="auto, cpu, cuda, ascend or a backend plugin (auto)"
    )
    p.add_argument("--device", default=None, help="e.g. cpu, cuda:1 (default: the backend's)")
    p.add_argument(
        "--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"], help="(auto)"
    )
    p.add_argument("--max-model-len", type=int, default=None, help="(the model's)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="sequences per step (64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="per step (1024)")
    p.add_argument(
        "--kv-cache-memory-gb", type=float, default=None, help="(sized from free memory)"
    )
    p.add_argument(
        "--kv-cache-dtype",
        default=None,
        choices=["auto", "int8", "fp8_e4m3"],
        help="KV cache storage: the model dtype, or 1-byte int8 / fp8 with scales (auto)",
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=None,
        help="split the model over N ranks, one process each (1)",
    )
    p.add_argument(
        "--quantization",
        default=None,
        choices=["none", "int8", "int4", "fp8"],
        help="quantize a dense checkpoint's weights at load (fp8: CUDA only) (none)",
    )
    p.add_argument("--num-threads", type=int, default=None, help="CPU threads (all cores)")
    _common(p, 8000)
    p.set_defaults(func=run_serve)


def add_gateway_arguments(p) -> None:
    p.add_argument(
        "--engines",
        nargs="+",
        default=None,
        metavar="URL",
        help="engine-only servers, e.g. http://127.0.0.1:8001 (`sage-llm serve --engine-only`)",
    )
    p.add_argument(
        "--routing",
        default=None,
        choices=["round_robin", "least_loaded", "prefix_affinity"],
        help="(least_loaded)",
    )
    _common(p, 8080)
    p.set_defaults(func=run_gateway)


def _flags(args, keys) -> dict:
    return {k: getattr(args, k, None) for k in keys}


def serve_configs(settings):
    """The control plane's BackendConfig and EngineConfig for `serve` with these settings."""
    from sagellm.control_plane import BackendConfig, EngineConfig

    backend = BackendConfig(kind=settings.backend, device=settings.device)
    engine = EngineConfig(
        kind=settings.engine_kind,
        model=settings.model,
        model_name=settings.model_name,
        engine_id=settings.engine_id,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        kv_cache_memory_gb=settings.kv_cache_memory_gb,
        kv_cache_dtype=settings.kv_cache_dtype,
        quantization=settings.quantization,
        tensor_parallel_size=settings.tensor_parallel_size,
        enable_prefix_caching=settings.enable_prefix_caching,
        num_threads=settings.num_threads,
    )
    return backend, engine


def _check_model(model: str | None) -> None:
    """Fail in a second, not after the server starts, when the model cannot be found."""
    from sagellm.models.errors import ModelNotFoundError

    try:
        if model is None:
            from sagellm.models.default_model import default_model_path

            default_model_path()
        else:
            from sagellm.models.resolve import resolve_model

            resolve_model(model)
    except ModelNotFoundError as e:
        raise StartupError(" ".join(str(e).split())) from None


def _gateway_settings(settings, engine_routes: bool):
    from sagellm.gateway import GatewaySettings

    return GatewaySettings(
        api_key=settings.api_key,
        max_concurrent=settings.max_concurrent,
        max_queue=settings.max_queue,
        request_timeout_s=settings.request_timeout_s,
        engine_routes=engine_routes,
        start_manager=False,  # started before uvicorn, so a failure is one line and exit 1
    )


async def _serve(manager, gw_settings, host: str, port: int, banner: str, log_level: str) -> None:
    from sagellm.gateway import create_app, make_server

    try:
        await manager.start()
    except Exception as e:
        await _quiet_stop(manager)
        raise StartupError(f"the engines did not start: {_one_line(e)}") from None
    if gw_settings.engine_routes:
        from sagellm.control_plane.engines import LocalEngine

        if not isinstance(manager.engines()[0], LocalEngine):
            await _quiet_stop(manager)
            raise StartupError("--engine-only needs an in-process engine (engine kind native)")
    app = create_app(manager, gw_settings)
    server = make_server(app, host, port, log_level=log_level)
    announce = asyncio.ensure_future(_announce(server, banner))
    # uvicorn drains on SIGINT/SIGTERM, then re-raises the signal to the handler it found; a
    # no-op handler there makes a drained shutdown exit 0 instead of dying by the signal.
    previous = _swallow_signals()
    try:
        await server.serve()
    finally:
        _restore_signals(previous)
        announce.cancel()
        await _quiet_stop(manager)  # a no-op when the app's lifespan already stopped it
    if not server.started:
        raise StartupError(f"cannot listen on {host}:{port} (in use, or not an address here)")


def _swallow_signals() -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


async def _announce(server, banner: str) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    print(banner, flush=True)


async def _quiet_stop(manager) -> None:
    try:
        await manager.stop()
    except Exception:  # stopping twice, or an engine that never started
        logging.getLogger("sagellm.cli").debug("manager.stop failed", exc_info=True)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) < 400 else text[:397] + "..."


def _run(cmd: str, build) -> int:
    from sagellm.cli.settings import SettingsError

    try:
        coro = build()
        asyncio.run(coro)
    except (SettingsError, StartupError, ValueError) as e:
        print(f"sage-llm {cmd}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def run_serve(args) -> int:
    def build():
        from sagellm.cli.settings import load_settings
        from sagellm.control_plane import ControlPlaneManager

        _configure_logging(args.log_level)
        settings, _ = load_settings(_flags(args, _SERVE_FLAGS))
        backend, engine = serve_configs(settings)
        if engine.kind == "native":
            _check_model(engine.model)
        manager = ControlPlaneManager(backend_config=backend, engine_configs=[engine])
        gw = _gateway_settings(settings, engine_routes=args.engine_only)
        url = f"http://{settings.host}:{settings.port}"
        what = "engine-only server" if args.engine_only else "serving"
        banner = (
            f"sageLLM {what}: {engine.served_name()} at {url}/v1 "
            f"(engine {engine.kind}; Ctrl-C stops)"
        )
        return _serve(manager, gw, settings.host, settings.port, banner, args.log_level)

    return _run("serve", build)


def run_gateway(args) -> int:
    def build():
        from sagellm.cli.settings import load_settings
        from sagellm.control_plane import ControlPlaneManager, EngineConfig

        _configure_logging(args.log_level)
        flags = _flags(args, ("api_key", "max_concurrent", "max_queue", "request_timeout_s"))
        flags.update({f"gateway.{k}": getattr(args, k) for k in ("host", "port", "engines")})
        flags["gateway.routing"] = args.routing
        settings, _ = load_settings(flags)
        gw = settings.gateway
        if not gw.engines:
            raise StartupError("no engines: pass --engines URL [URL ...] (or gateway.engines)")
        engines = [
            EngineConfig(kind="remote", url=url, engine_id=f"engine-{i}")
            for i, url in enumerate(gw.engines)
        ]
        manager = ControlPlaneManager(engine_configs=engines, routing=gw.routing)
        url = f"http://{gw.host}:{gw.port}"
        banner = (
            f"sageLLM gateway at {url}/v1 -> {', '.join(gw.engines)} ({gw.routing}; Ctrl-C stops)"
        )
        return _serve(
            manager, _gateway_settings(settings, False), gw.host, gw.port, banner, args.log_level
        )

    return _run("gateway", build)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
