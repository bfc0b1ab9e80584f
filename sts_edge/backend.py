"""The protocol between the backend-agnostic core and a framework (PyTorch or MLX).

A backend loads a model directory into a `CausalLM`: a model with its own preallocated KV cache
on the backend's device. The core's loop (speculative.py) asks it for the steps of a speculative
round, not for layers or logits:

    prefill(tokens)                          Distributions of the last position
    draft(pending, gamma, sampling, rng)     a Proposal: gamma tokens, the distributions they were
                                             drawn from, and for STS the round's attention scores
                                             (with sparse drafting, the first step's; the later
                                             steps read the draft's own sets chosen from them)
    verify(block, sampling, plan, scores)    Distributions at every position of the block; with a
                                             VerificationPlan each target layer reads only the sets
                                             the plan's policy selects, on the device
    rollback(length)                         forget positions from `length` on, in O(1)

Distributions, scores and sets stay on the backend's device. The core moves only what the
acceptance rule needs: the argmax at temperature 0, else the probabilities of the drafted tokens
and at most one whole row per round. Measurements (calibration, recall) pass a
VerificationObserver, which is handed each layer's queries and keys as numpy: the one place
where per-layer data crosses to the host, and only when asked.

`BackendModel` is what every backend shares: the committed length, the checks before a forward,
chunked prefill and the draft loop. A backend supplies `_forward`, its Distributions and its
score buffer; a backend that drafts on its device overrides `draft`, and the protocol stays.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from sts_edge.config import ModelConfig
from sts_edge.errors import BackendUnavailableError
from sts_edge.mask import VerificationPlan
from sts_edge.sampling import GREEDY, SamplingParams

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds activation memory on long prompts
# KV cache precisions a backend offers: 16 is the model's own dtype; 8 and 4 are quantized with a
# scale and a bias per KV_GROUP_SIZE values of head_dim (or per head where head_dim is smaller),
# around a fixed per-channel centre (backends/torch/quantized_kv.py).
KV_BITS = (16, 8, 4)
KV_GROUP_SIZE = 32

# backend name -> (module serving it, what to install when it is missing)
BACKENDS: dict[str, tuple[str, str]] = {
    "cuda": ("sts_edge.backends.torch", 'pip install -e ".[cuda]" from the sts-edge checkout, on a machine with an NVIDIA GPU'),
    "torch-cpu": ("sts_edge.backends.torch", "pip install torch --index-url https://download.pytorch.org/whl/cpu "
                  '(the CPU build), then pip install -e ".[cpu]" from the sts-edge checkout'),
    "mlx": ("sts_edge.backends.mlx", 'pip install -e ".[mlx]" from the sts-edge checkout'),
}


class Distributions(Protocol):
    """Next-token distributions at some positions, on the backend's device: softmax of the logits
    after the sampling settings (temperature, top-k, top-p), one-hot at the argmax when greedy."""

    def __len__(self) -> int: ...

    def argmax(self) -> list[int]:
        """The likeliest token of every row."""
        ...

    def probs_of(self, tokens: Sequence[int]) -> np.ndarray:
        """p_i(tokens[i]) for the first len(tokens) rows, float64."""
        ...

    def row(self, index: int) -> np.ndarray:
        """One whole distribution on the host, float64 (negative indices count from the end)."""
        ...

    def logits(self) -> np.ndarray:
        """The raw logits [rows, vocab] as float32 on the host: for measurements, not the loop."""
        ...


@dataclass(frozen=True)
class ScoreSpec:
    """What a draft round collects for STS: per draft layer and unit (KV head or query head), the
    max or sum over the round's queries of their attention probabilities."""

    granularity: str
    aggregation: str


class DraftScores(Protocol):
    """A round's running [layers, units, capacity] score buffer, on the backend's device."""

    spec: ScoreSpec

    def numpy(self, context: int) -> np.ndarray:
        """The scores [layers, units, context] of the first positions, on the host (measurements)."""
        ...


@dataclass
class Proposal:
    """What the draft proposes in a round."""

    tokens: list[int]
    probs: Distributions  # [gamma] rows: what each token was drawn from
    scores: DraftScores | None  # with a ScoreSpec: the round's attention scores, for the target's selection


class VerificationObserver(Protocol):
    """Sees every layer of a forward: its queries [heads, n, head_dim] (rotated) and the keys
    [kv_heads, context + n, head_dim] they attend over, as float32 numpy. For measurements."""

    def observe(self, layer: int, q: np.ndarray, keys: np.ndarray) -> None: ...


class CausalLM(Protocol):
    """A loaded model with its KV cache. Batch size one: a local, single-user runtime."""

    config: ModelConfig
    capacity: int  # positions the KV cache can hold
    precision: str  # e.g. "int4 weights, float32 activations, 2 threads": for the stats line

    @property
    def length(self) -> int:
        """Positions committed to the KV cache."""
        ...

    def prefill(self, tokens: Sequence[int], sampling: SamplingParams = GREEDY) -> Distributions:
        """Append `tokens` (in chunks) and return the distribution after the last one."""
        ...

    def draft(self, pending: Sequence[int], gamma: int, sampling: SamplingParams, rng: np.random.Generator, *,
              vocab: int | None = None, scores: ScoreSpec | None = None, forced: Sequence[int] | None = None,
              sparse_steps: VerificationPlan | None = None) -> Proposal:
        """Run `pending` (the tokens the cache lacks), then propose `gamma` tokens, each drawn from
        the distribution after the one before (over the first `vocab` ids) and run in turn, but the
        last. With `scores`, the round's attention is folded into a fresh score buffer. `forced`
        proposes the given tokens instead of drawing them (teacher forcing, for measurements).
        `sparse_steps` (with `scores`; VerificationPlan.for_draft): only the first step attends
        densely and writes the scores; the others read the sets this plan selects from them."""
        ...

    def verify(self, block: Sequence[int], sampling: SamplingParams = GREEDY, plan: VerificationPlan | None = None,
               draft_scores: DraftScores | None = None, observer: VerificationObserver | None = None) -> Distributions:
        """Append `block` and return the distributions at each of its positions. With `plan`, each
        layer reads the sets its policy selects (sts: from `draft_scores`); `observer` sees every layer."""
        ...

    def rollback(self, length: int) -> None:
        """Forget every position from `length` on; O(1), nothing is copied."""
        ...


def check_forward(start: int, n: int, capacity: int) -> None:
    """What every backend's forward checks before touching the cache."""
    if n == 0:
        raise ValueError("forward needs at least one token")
    if start + n > capacity:
        raise ValueError(f"{start + n} positions exceed the KV cache capacity {capacity}")


class BackendModel:
    """The part of a CausalLM every backend shares. A subclass implements:

    _forward(tokens, start, last_only, *, scores, plan, draft_scores, observer) -> device logits
        [n or 1, vocab] of tokens (a list, or the device array _choose returned) placed at start..; folds attention into `scores` (a buffer from
        _new_scores) when given; with `plan`, reads the sets it selects.
    _distributions(logits, sampling, vocab) -> Distributions over the first `vocab` ids.
    _choose(logits, sampling, uniform) -> the token [1] after logits [1, vocab], as a device array:
        the argmax when greedy, else sts_edge.sampling.sample's draw for `uniform`.
    _concat(arrays) -> the rows one after another.
    _new_scores(spec) -> a zeroed DraftScores buffer.
    """

    def __init__(self, config: ModelConfig, capacity: int):
        self.config, self.capacity = config, capacity
        self._length = 0
        self.precision = ""  # what the stats line says of the weights, activations and threads
        self.prefill_chunk = PREFILL_CHUNK  # a backend short of memory sets less

    @property
    def length(self) -> int:
        return self._length

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot roll back to {length}: {self._length} positions are committed")
        self._length = int(length)

    def prefill(self, tokens: Sequence[int], sampling: SamplingParams = GREEDY) -> Distributions:
        if not tokens:
            raise ValueError("prefill needs at least one token")
        for begin in range(0, len(tokens), self.prefill_chunk):
            logits = self._step(tokens[begin : begin + self.prefill_chunk], last_only=True)
        return self._distributions(logits, sampling, None)

    def verify(self, block: Sequence[int], sampling: SamplingParams = GREEDY, plan: VerificationPlan | None = None,
               draft_scores: DraftScores | None = None, observer: VerificationObserver | None = None) -> Distributions:
        if plan is not None and plan.needs_draft_scores(self._length) and draft_scores is None:
            raise ValueError("the sts policy selects from the draft's scores: pass the round's draft_scores")
        logits = self._step(block, last_only=False, plan=plan, draft_scores=draft_scores, observer=observer)
        return self._distributions(logits, sampling, None)

    def draft(self, pending: Sequence[int], gamma: int, sampling: SamplingParams, rng: np.random.Generator, *,
              vocab: int | None = None, scores: ScoreSpec | None = None, forced: Sequence[int] | None = None,
              sparse_steps: VerificationPlan | None = None) -> Proposal:
        if forced is not None and len(forced) != gamma:
            raise ValueError(f"forced proposals must be gamma = {gamma} tokens, got {len(forced)}")
        if sparse_steps is not None and scores is None:
            raise ValueError("sparse draft steps select from the round's first step's scores: pass scores")
        buffer = self._new_scores(scores) if scores is not None else None
        # Every draw of the round up front (as many as one by one), so that each token can be chosen
        # where its logits are, and the host waits once per round, for the tokens, not once per step.
        uniforms = [None] * gamma if sampling.greedy or forced is not None else rng.random(gamma).tolist()
        rows, chosen = [], []
        for i in range(gamma):
            reads = dict(scores=buffer) if i == 0 or sparse_steps is None else dict(plan=sparse_steps, draft_scores=buffer)
            logits = self._step(pending, last_only=True, **reads)
            rows.append(logits)
            pending = [int(forced[i])] if forced is not None else \
                self._choose(logits[-1:, :vocab], sampling, uniforms[i])
            chosen.append(pending)
        tokens = [int(t) for t in forced] if forced is not None else self._concat(chosen).tolist()
        return Proposal(tokens, self._distributions(self._concat(rows), sampling, vocab), buffer)

    def _step(self, tokens, last_only: bool, **reads: Any):
        start, n = self._length, len(tokens)
        check_forward(start, n, self.capacity)
        logits = self._forward(tokens if hasattr(tokens, "shape") else list(tokens), start, last_only, **reads)
        self._length = start + n
        return logits

    def _forward(self, tokens, start: int, last_only: bool, *, scores=None, plan=None, draft_scores=None,
                 observer=None):
        raise NotImplementedError

    def _distributions(self, logits, sampling: SamplingParams, vocab: int | None) -> Distributions:
        raise NotImplementedError

    def _choose(self, logits, sampling: SamplingParams, uniform: float | None):
        raise NotImplementedError

    def _concat(self, arrays: list):
        raise NotImplementedError

    def _new_scores(self, spec: ScoreSpec) -> DraftScores:
        raise NotImplementedError


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def auto_backend() -> str:
    """The best backend this machine can run: MLX on Apple silicon, CUDA with a GPU, else the CPU."""
    if sys.platform == "darwin" and platform.machine() == "arm64" and _installed("mlx"):
        return "mlx"
    if _installed("torch"):
        return importlib.import_module(BACKENDS["cuda"][0]).auto_device()
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
    if name == "cuda" and importlib.import_module(BACKENDS[name][0]).auto_device() != "cuda":
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
    threads: int | None = None,
    kv_bits: int = 16,
) -> CausalLM:
    """Load a model directory on a backend, with a KV cache of `max_seq_len` positions.

    `max_seq_len` defaults to the model's max_position_embeddings capped at 8192. `dtype` defaults
    to the backend's natural choice (bfloat16 on a GPU; on a CPU bfloat16 where it multiplies it
    natively, else float32). `threads`: the CPU's intra-op threads (default: STS_EDGE_THREADS, else
    one per physical core, unless OMP_NUM_THREADS is set). `kv_bits` 8 or 4 quantizes the KV
    cache, group-wise affine along head_dim (for a draft: its precision may change acceptance,
    never the output); 16 keeps it in the model's dtype.
    """
    if kv_bits not in KV_BITS:
        raise ValueError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))}, got {kv_bits!r}")
    name = resolve_backend(backend)
    config = ModelConfig.from_model_dir(model_dir)
    module = importlib.import_module(BACKENDS[name][0])
    return module.load_model(Path(model_dir), config, device=name, max_seq_len=default_capacity(config, max_seq_len),
                             dtype=dtype, threads=threads, kv_bits=kv_bits)
