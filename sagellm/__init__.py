"""sageLLM: a modular LLM inference engine (native CPU/CUDA kernels, OpenAI-compatible server).

Importing sagellm loads the native extension, which registers torch.ops.sagellm.*.
"""

import torch  # noqa: F401  (must be loaded before the extension: it links against libtorch)

from sagellm import _C  # noqa: F401  (registers torch.ops.sagellm.*)

__version__ = "0.1.0"
