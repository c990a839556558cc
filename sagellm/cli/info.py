"""`sage-llm info`: the machine, the torch build, and what the native extension contains."""

from __future__ import annotations

import json
import os
import platform
import sys

from sagellm.backends.cpu import cpu_model


def collect() -> dict:
    import torch

    import sagellm
    from sagellm import ops

    info: dict = {
        "sagellm": sagellm.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": {
            "model": cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "torch": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
        },
        "native": ops.build_info(),
        "gguf_weights": gguf_weights(),
        "kv_cache_dtypes": kv_cache_dtypes(),
        "backends": backends(),
        "engines": engines(),
    }
    if torch.cuda.is_available():
        info["torch"]["gpus"] = [
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        ]
    return info


def gguf_weights() -> dict:
    """GGUF weight type -> what multiplies with it on the CPU when a GGUF model loads with
    --dtype auto: the gguf_linear kernel variant, or dense (dequantized at load)."""
    from gguf import GGMLQuantizationType

    from sagellm.models.gguf_loader import DEQUANTIZABLE_TYPES
    from sagellm.models.layers.linear import gguf_native_types
    from sagellm.ops import quant

    native = gguf_native_types("cpu")
    out = {}
    for t in sorted(DEQUANTIZABLE_TYPES, key=int):
        if int(t) in native:
            out[t.name] = f"gguf_linear {quant.gguf_kernel(int(t))}"
        elif t in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            out[t.name] = "dense"
        else:
            out[t.name] = "dense (dequantized at load)"
    return out


def kv_cache_dtypes() -> dict:
    """--kv-cache-dtype value -> per device present, "ok" or why the kernels refuse it (checked
    by running a tiny cache write and decode, head_size 128, bf16 queries on CUDA, fp32 on CPU)."""
    import torch

    from sagellm import ops
    from sagellm.runtime.config import KV_CACHE_DTYPES
    from sagellm.runtime.model_runner import probe_kv_cache

    devices = {"cpu": torch.float32}
    if torch.cuda.is_available() and ops.build_info()["cuda"]:
        devices["cuda"] = torch.bfloat16
    out = {}
    for name, kv in {"auto": None, **KV_CACHE_DTYPES}.items():
        out[name] = {}
        for dev, model_dtype in devices.items():
            reason = probe_kv_cache(kv or model_dtype, model_dtype, 2, 128, dev)
            out[name][dev] = "ok" if reason is None else reason
    return out


def backends() -> dict:
    """Every hardware backend (built-in and plugin): availability, device, dtypes, memory."""
    from sagellm import backends as registry

    out = {name: b.describe() for name, b in registry.list_backends().items()}
    for name, err in registry.plugin_errors().items():
        out[name] = {"name": name, "available": False, "error": err}
    for name, desc in out.items():
        desc["plugin"] = name not in registry.BUILTIN
    return out


def engines() -> dict:
    """Every engine plugin kind -> the factory it names (group sagellm.engines)."""
    from sagellm.control_plane.engines import BUILTIN_ENGINES, engine_plugins

    return {
        kind: {"factory": target, "plugin": kind not in BUILTIN_ENGINES}
        for kind, target in engine_plugins().items()
    }


def _render_backend(d: dict) -> str:
    if d.get("error"):
        return f"  {d['name']:<10}  failed to load: {d['error']}"
    state = "available" if d["available"] else "not available"
    parts = [f"  {d['name']:<10}  {state}"]
    if d["available"]:
        parts.append(f"device {d['device']}")
        mem = d.get("memory")
        if mem:
            parts.append(
                f"{mem['free_bytes'] / 2**30:.1f} of {mem['total_bytes'] / 2**30:.1f} GiB free"
            )
    parts.append(f"dtypes {', '.join(d['dtypes'])}")
    if d.get("plugin"):
        parts.append("plugin")
    return " — ".join(parts)


def _render_gguf(kernels: dict) -> list[str]:
    """Kernel types one per line; the many dequantized-at-load types on one line."""
    lines = [f"  {t:<12}  {k}" for t, k in kernels.items() if k.startswith("gguf_linear")]
    lines.append(f"  {'F32/F16/BF16':<12}  dense")
    rest = [t for t, k in kernels.items() if k.startswith("dense (")]
    if rest:
        lines.append(f"  {'others':<12}  dense (dequantized at load): {' '.join(rest)}")
    if any(k.startswith("gguf_linear") for k in kernels.values()):
        lines.append(f"  {'':<12}  token embeddings: looked-up rows dequantized per step")
    return lines


def render(info: dict) -> str:
    nat = info["native"]
    lines = [
        f"sageLLM       {info['sagellm']}",
        f"Python        {info['python']} ({info['platform']})",
        f"CPU           {info['cpu']['model']} — {info['cpu']['cores']} cores, "
        f"torch threads {info['cpu']['torch_threads']}",
        f"torch         {info['torch']['version']} (CUDA {info['torch']['cuda'] or 'none'}, "
        f"GPU available: {info['torch']['cuda_available']})",
    ]
    for i, name in enumerate(info["torch"].get("gpus", [])):
        lines.append(f"  GPU {i}       {name}")
    lines += [
        "native build  sagellm._C",
        f"  CPU ISA     {nat['cpu_isa']} (compiled: {', '.join(nat['cpu_isas_compiled'])}; "
        f"this CPU supports: {', '.join(nat['cpu_isas_supported'])})",
        f"  CUDA        {'sm ' + nat['cuda_arches'] if nat['cuda'] else 'not built'}",
        f"  Ascend      {'built' if nat['ascend'] else 'not built'}",
        f"  built with  torch {nat['torch_version']}",
        "GGUF weights  (CPU, --dtype auto; a named --dtype dequantizes all)",
        *_render_gguf(info["gguf_weights"]),
        "KV cache      (--kv-cache-dtype; checked on each device)",
        *(
            f"  {name:<12}  " + "; ".join(f"{d}: {r}" for d, r in devs.items())
            for name, devs in info["kv_cache_dtypes"].items()
        ),
        "backends      (entry-point group sagellm.backends)",
        *(_render_backend(d) for d in info["backends"].values()),
        "engines       (entry-point group sagellm.engines)",
        *(
            f"  {kind:<10}  {e['factory']}{' — plugin' if e['plugin'] else ''}"
            for kind, e in info["engines"].items()
        ),
    ]
    return "\n".join(lines)


def run(args) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the same as JSON")
    parser.set_defaults(func=run)
