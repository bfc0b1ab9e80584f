"""sts-edge: long-context LLM decoding with Speculative Token Sparsity.

The core package imports neither torch nor MLX; a backend is loaded when a model is.
"""

from sts_edge.api import Engine, Generation, load
from sts_edge.errors import (
    BackendUnavailableError,
    ContextLengthError,
    IncompatibleModelsError,
    ModelLoadError,
    StsEdgeError,
)
from sts_edge.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = [
    "BackendUnavailableError",
    "ContextLengthError",
    "Engine",
    "Generation",
    "IncompatibleModelsError",
    "ModelLoadError",
    "SamplingParams",
    "StsEdgeError",
    "load",
]
