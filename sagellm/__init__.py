"""sageLLM: a modular LLM inference engine (native CPU/CUDA kernels, OpenAI-compatible server).

Importing sagellm loads the native extension, which registers torch.ops.sagellm.*.
"""

import torch  # noqa: F401  (must be loaded before the extension: it links against libtorch)

from sagellm import _C  # noqa: F401  (registers torch.ops.sagellm.*)

__version__ = "0.1.0"

# The control plane is exported lazily so that `import sagellm` stays light.
_LAZY = {
    "ControlPlaneManager": "sagellm.control_plane.manager",
    "BackendConfig": "sagellm.control_plane.config",
    "EngineConfig": "sagellm.control_plane.config",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sagellm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
