"""The small protocol between the backend-agnostic core and a framework (torch or MLX).

A backend loads a model directory into a `CausalLM`: a model plus its own preallocated KV cache.
The speculative loop needs only a few things from it: run some tokens and get logits back, know
how many positions are committed, forget positions past a given length (O(1) rollback), and the
config. Logits come back as float32 numpy rows so that sampling and acceptance are written once.

For STS, a draft collects its attention scores during a round (start_scores / read_scores), and
a target's forward takes a VerificationMask that hands each layer its token index sets.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from sts_edge.config import ModelConfig
from sts_edge.errors import BackendUnavailableError
from sts_edge.mask import VerificationMask

# backend name -> (module serving it, what to install when it is missing)
BACKENDS: dict[str, tuple[str, str]] = {
    "cuda": ("sts_edge.backends.cuda", 'pip install -e ".[cuda]" from the sts-edge checkout, on a machine with an NVIDIA GPU'),
    "torch-cpu": ("sts_edge.backends.cuda", "pip install torch --index-url https://download.pytorch.org/whl/cpu "
                  '(the CPU build), then pip install -e ".[cpu]" from the sts-edge checkout'),
    "mlx": ("sts_edge.backends.mlx", 'pip install -e ".[mlx]" from the sts-edge checkout'),
}


class CausalLM(Protocol):
    """A loaded model with its KV cache. Batch size is one: this is a local, single-user runtime."""

    config: ModelConfig
    capacity: int  # positions the KV cache can hold

    @property
    def length(self) -> int:
        """Positions committed to the KV cache."""
        ...

    def forward(self, tokens: Sequence[int], all_logits: bool = False, mask: VerificationMask | None = None) -> np.ndarray:
        """Append `tokens` at positions length.. and return float32 logits.

        Returns [len(tokens), vocab] when `all_logits`, else [1, vocab] for the last token only.
        With `mask` (whose context must equal `length`), each layer's attention over the context
        reads only the rows `mask.sets_for(layer, ...)` gives it, plus the new tokens causally.
        """
        ...

    def start_scores(self, granularity: str, aggregation: str) -> None:
        """Zero a running [layers, units, capacity] score buffer; later forwards fold their
        attention probabilities into it (max or sum over queries, and over each group's query
        heads at "kv" granularity)."""
        ...

    def read_scores(self, context: int, on_device: bool = False) -> np.ndarray:
        """Stop collecting and return the scores [layers, units, context] of the first positions.

        With `on_device`, a backend may return its own device array instead of numpy, with
        >= context positions (the CUDA backend returns its whole running buffer, from which a
        CUDA graph selects at any position): the verification mask then selects the token sets
        on the device.
        """
        ...

    def rollback(self, length: int) -> None:
        """Forget every position from `length` on; O(1), nothing is copied."""
        ...


def check_forward(start: int, n: int, capacity: int, mask: VerificationMask | None) -> None:
    """What every backend's forward checks before touching the cache."""
    if n == 0:
        raise ValueError("forward needs at least one token")
    if start + n > capacity:
        raise ValueError(f"{start + n} positions exceed the KV cache capacity {capacity}")
    if mask is not None and mask.context != start:
        raise ValueError(f"the mask indexes a context of {mask.context} tokens but {start} are committed")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def auto_backend() -> str:
    """The best backend this machine can run: MLX on Apple silicon, CUDA with a GPU, else the CPU."""
    if sys.platform == "darwin" and platform.machine() == "arm64" and _installed("mlx"):
        return "mlx"
    if _installed("torch"):
        import torch

        return "cuda" if torch.cuda.is_available() else "torch-cpu"
    if _installed("mlx"):
        return "mlx"
    raise BackendUnavailableError(
        'no backend is installed: from the sts-edge checkout, pip install -e ".[cuda]" (NVIDIA), ".[mlx]" (Apple '
        "silicon), or PyTorch's CPU build for a CPU (see README.md)"
    )


def resolve_backend(name: str = "auto") -> str:
    """Check a backend name (or pick one for "auto") and that its libraries and device are present."""
    if name == "auto":
        return auto_backend()
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")
    framework = "mlx" if name == "mlx" else "torch"
    if not _installed(framework):
        raise BackendUnavailableError(f"backend {name!r} needs {framework}: {BACKENDS[name][1]}")
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailableError("backend 'cuda' needs an NVIDIA GPU and a CUDA build of torch; use --backend torch-cpu")
    return name


def default_capacity(config: ModelConfig, max_seq_len: int | None) -> int:
    """KV cache positions: `max_seq_len`, or the model's context capped at 8192 so that a 128K-context
    model does not reserve a 128K cache unless asked."""
    return max_seq_len or min(config.max_position_embeddings, 8192)


def reset_peak_memory(backend: str) -> None:
    """Start a new peak-memory measurement on a resolved backend's device."""
    importlib.import_module(BACKENDS[backend][0]).reset_peak_memory(backend)


def peak_memory(backend: str) -> tuple[int, str]:
    """(bytes at most since the last reset, what they measure: "GPU", "Metal" or "process RSS")."""
    return importlib.import_module(BACKENDS[backend][0]).peak_memory(backend)


def load_model(
    model_dir: str | Path,
    backend: str = "auto",
    *,
    max_seq_len: int | None = None,
    dtype: str | None = None,
) -> CausalLM:
    """Load a model directory on a backend, with a KV cache of `max_seq_len` positions.

    `max_seq_len` defaults to the model's max_position_embeddings capped at 8192, so that a
    128K-context model does not reserve a 128K cache unless asked. `dtype` defaults to the
    backend's natural choice (bfloat16 on a GPU, float32 on a CPU).
    """
    name = resolve_backend(backend)
    config = ModelConfig.from_model_dir(model_dir)
    module = importlib.import_module(BACKENDS[name][0])
    capacity = default_capacity(config, max_seq_len)
    return module.load_model(Path(model_dir), config, device=name, max_seq_len=capacity, dtype=dtype)
