"""`sage-llm info`: the machine, the torch build, and what the native extension contains."""

from __future__ import annotations

import json
import os
import platform
import sys


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    }
    if torch.cuda.is_available():
        info["torch"]["gpus"] = [
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        ]
    return info


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
    ]
    return "\n".join(lines)


def run(args) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the same as JSON")
    parser.set_defaults(func=run)
