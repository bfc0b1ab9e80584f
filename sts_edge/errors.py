"""Errors that users see. Each message says what is wrong and what to do about it."""


class StsEdgeError(Exception):
    """Base class for every error sts-edge raises on purpose."""


class ModelLoadError(StsEdgeError):
    """A model directory is missing, incomplete, or holds something we cannot run."""


class IncompatibleModelsError(StsEdgeError):
    """The draft cannot draft for the target (different tokenizer or vocabulary)."""


class ContextLengthError(StsEdgeError):
    """The prompt plus the tokens to generate do not fit in the KV cache."""


class BackendUnavailableError(StsEdgeError):
    """The requested backend's libraries are not installed or its device is absent."""


class ChatTemplateError(StsEdgeError):
    """Chat messages the model's template cannot render (or a model without one)."""
