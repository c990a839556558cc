"""Exceptions raised while finding and loading a model.

All derive from `ModelLoadError`, so the CLI can turn any of them into a one-line reason.
"""

from __future__ import annotations


class ModelLoadError(Exception):
    """A model could not be found, understood or read."""


class ModelNotFoundError(ModelLoadError):
    """No location had the model; the message lists every place that was tried."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is readable but uses an architecture or tensor type sageLLM cannot run."""


class CorruptCheckpointError(ModelLoadError):
    """A checkpoint file is truncated or malformed; the message names the file."""


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template, so chat messages cannot be formatted."""
