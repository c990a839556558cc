"""`sage-llm install {cpu,cuda,ascend,kunlun,haiguang} [--dry-run]`: install the torch build for
that hardware, then rebuild sageLLM against it.

The native extension links against the torch it was built with, so changing torch always means
rebuilding sageLLM (`pip install --no-build-isolation`), never just swapping torch.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

TORCH_INDEX = "https://download.pytorch.org/whl"
DEFAULT_CUDA = "cu128"
BUILD_DEPS = ["scikit-build-core>=0.10", "pybind11>=2.12", "ninja", "cmake"]

NOTES = {
    "cpu": "The CPU wheel of torch (no CUDA libraries, a few hundred MB instead of several GB).",
    "cuda": "The CUDA wheel of torch, then the extension rebuilt with SAGELLM_CUDA=ON "
    "(needs nvcc from a CUDA toolkit of the same major version).",
    "ascend": "torch plus torch-npu of the same version; needs the CANN toolkit installed and "
    "sourced (set_env.sh) first. torch-npu is published only for some torch versions: see "
    "https://gitee.com/ascend/pytorch for the pairs.",
    "kunlun": "INSTALL-ONLY: Kunlun XPUs need Baidu's torch build (torch_xmlir) from the Kunlun "
    "SDK, which is not on PyPI. sageLLM has no Kunlun kernels: once torch imports, sageLLM runs "
    "on the CPU backend there. Nothing is installed by this command.",
    "haiguang": "INSTALL-ONLY: Hygon DCUs (Haiguang) need the vendor's ROCm/DTK build of torch "
    "from the Hygon developer community. sageLLM has no DCU kernels: once torch imports, sageLLM "
    "runs on the CPU backend there. Nothing is installed by this command.",
}
VENDOR_STEPS = {
    "kunlun": [
        "install the Kunlun driver and XRE runtime (Baidu Kunlun SDK)",
        "install the torch and torch_xmlir wheels shipped with the SDK",
        "sage-llm install cpu --skip-torch   # rebuild sageLLM against that torch",
    ],
    "haiguang": [
        "install the DCU driver and DTK (Hygon's ROCm distribution)",
        "install the DTK torch wheel from the Hygon developer community for your DTK version",
        "sage-llm install cpu --skip-torch   # rebuild sageLLM against that torch",
    ],
}


def add_arguments(p) -> None:
    p.add_argument("target", choices=["cpu", "cuda", "ascend", "kunlun", "haiguang"])
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument(
        "--torch-version",
        default=None,
        help="torch version to install (default: the installed torch's, e.g. 2.13.0)",
    )
    p.add_argument(
        "--cuda",
        default=DEFAULT_CUDA,
        help=f"CUDA wheel tag for `cuda` (default {DEFAULT_CUDA}; e.g. cu126, cu130)",
    )
    p.add_argument(
        "--skip-torch", action="store_true", help="only rebuild sageLLM against the current torch"
    )
    p.set_defaults(func=run)


def installed_torch_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("torch")
    except PackageNotFoundError:
        return None
    return v.split("+", 1)[0]


def source_root() -> Path | None:
    """The checkout sageLLM runs from, when it is an editable/source install."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "csrc").is_dir() else None


def plan(target: str, torch_version: str | None, cuda: str, skip_torch: bool) -> list[list[str]]:
    """The commands to run, in order (empty for install-only targets)."""
    if target in VENDOR_STEPS:
        return []
    pip = [sys.executable, "-m", "pip", "install"]
    pin = f"torch=={torch_version}" if torch_version else "torch"
    cmds: list[list[str]] = []
    if not skip_torch:
        # The local label (+cpu, +cu128) makes pip replace a torch of the same version built
        # for other hardware, which `torch==2.13.0` alone would accept as already installed.
        if target == "cpu":
            local = f"{pin}+cpu" if torch_version else pin
            cmds.append([*pip, local, "--index-url", f"{TORCH_INDEX}/cpu"])
        elif target == "cuda":
            if not cuda.startswith("cu") or not cuda[2:].isdigit():
                raise ValueError(f"--cuda = {cuda!r} is invalid: expected a tag like cu128")
            local = f"{pin}+{cuda}" if torch_version else pin
            cmds.append([*pip, local, "--index-url", f"{TORCH_INDEX}/{cuda}"])
        elif target == "ascend":
            # torch-npu pins torch itself; torch from the CPU index avoids pulling CUDA libraries.
            cmds.append([*pip, pin, "--index-url", f"{TORCH_INDEX}/cpu"])
            npu = f"torch-npu=={torch_version}" if torch_version else "torch-npu"
            cmds.append([*pip, npu, "numpy<2", "decorator", "scipy", "attrs", "psutil"])
    cmds.append([*pip, *BUILD_DEPS])
    root = source_root()
    env = ["env", "SAGELLM_CUDA=ON"] if target == "cuda" else []
    if target == "ascend":
        env = ["env", "SAGELLM_ASCEND=ON"]
    if root is not None:
        cmds.append([*env, *pip, "--no-build-isolation", "-e", str(root)])
    else:
        cmds.append(
            [*env, *pip, "--no-build-isolation", "--force-reinstall", "--no-deps", "isagellm"]
        )
    return cmds


def run(args) -> int:
    version = args.torch_version or installed_torch_version()
    try:
        cmds = plan(args.target, version, args.cuda, args.skip_torch)
    except ValueError as e:
        print(f"sage-llm install: error: {e}", file=sys.stderr)
        return 2
    print(f"# {args.target}: {NOTES[args.target]}")
    if args.target in VENDOR_STEPS:
        for i, step in enumerate(VENDOR_STEPS[args.target], 1):
            print(f"#   {i}. {step}")
        return 0
    for cmd in cmds:
        print(shlex.join(cmd))
    if args.dry_run:
        print("# dry run: nothing was run")
        return 0
    for cmd in cmds:
        print(f"$ {shlex.join(cmd)}", flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"sage-llm install: error: `{shlex.join(cmd)}` exited with {rc}", file=sys.stderr)
            return rc
    print("# done: check with `sage-llm info`")
    return 0
