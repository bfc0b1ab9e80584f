"""Loading a model directory into the MLX model, and the CausalLM the core drives."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from sts_edge.backend import check_forward
from sts_edge.backends.mlx.attention import ScoreCollection
from sts_edge.backends.mlx.model import KVCache, Transformer
from sts_edge.config import ModelConfig
from sts_edge.errors import ModelLoadError
from sts_edge.mask import VerificationMask, units
from sts_edge.memory import process_peak, reset_process_peak
from sts_edge.quantization import module_settings
from sts_edge.weights import check_complete, checkpoint_files, internal_name

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def metal_available() -> bool:
    return mx.metal.is_available()


class MLXCausalLM:
    """A Transformer with its KV caches and committed length (the CausalLM protocol)."""

    def __init__(self, model: Transformer, capacity: int, dtype: mx.Dtype):
        self.model = model
        self.config = model.config
        self.capacity = capacity
        c = model.config
        self.caches = [KVCache(c.num_key_value_heads, capacity, c.head_dim, dtype) for _ in range(c.num_hidden_layers)]
        self._length = 0
        self._scores: ScoreCollection | None = None  # set while a draft round collects scores

    @property
    def length(self) -> int:
        return self._length

    def forward(self, tokens: Sequence[int], all_logits: bool = False, mask: VerificationMask | None = None) -> np.ndarray:
        start, n = self._length, len(tokens)
        check_forward(start, n, self.capacity, mask)
        ids = mx.array(list(tokens), dtype=mx.int32)
        logits = self.model(ids, self.caches, start, all_logits, mask=mask, scores=self._scores)
        # Evaluate the cache (and score) writes with the logits so the lazy graph never outlives one step.
        mx.eval(logits, [(c.keys, c.values) for c in self.caches], self._scores.buffer if self._scores else [])
        self._length = start + n
        return np.array(logits.astype(mx.float32))

    def start_scores(self, granularity: str, aggregation: str) -> None:
        """Begin a round: zero the running scores and fold every forward's attention into them."""
        shape = (self.config.num_hidden_layers, units(self.config, granularity), self.capacity)
        self._scores = ScoreCollection(mx.zeros(shape, dtype=mx.float32), aggregation, granularity)

    def read_scores(self, context: int, on_device: bool = False) -> np.ndarray:
        """End a round: the scores [layers, units, context] of the first `context` positions."""
        if self._scores is None:
            raise RuntimeError("read_scores without start_scores")
        scores, self._scores = self._scores, None
        return np.array(scores.buffer[:, :, :context])

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot roll back to {length}: {self._length} positions are committed")
        self._length = int(length)


def reset_peak_memory(device: str) -> None:
    """Start measuring peak memory afresh: MLX's Metal allocator, or the process on the CPU."""
    if metal_available():
        mx.reset_peak_memory()
    else:
        reset_process_peak()


def peak_memory(device: str) -> tuple[int, str]:
    """(bytes, what they measure) since the last reset."""
    if metal_available():
        return mx.get_peak_memory(), "Metal"
    return process_peak(), "process RSS"


def load_model(model_dir: Path, config: ModelConfig, *, device: str, max_seq_len: int, dtype: str | None) -> MLXCausalLM:
    if dtype is None:
        # Half precision on Apple GPUs; the CPU build (Linux) runs float32 for exact agreement.
        dtype = ("float16" if config.torch_dtype == "float16" else "bfloat16") if metal_available() else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    mlx_dtype = DTYPES[dtype]

    weights: dict[str, mx.array] = {}
    for path in checkpoint_files(model_dir):
        for name, array in mx.load(str(path)).items():
            mapped = internal_name(name, config)
            if mapped is not None:  # packed uint32 quantized weights keep their type
                weights[mapped] = array.astype(mlx_dtype) if mx.issubdtype(array.dtype, mx.floating) else array
    check_complete(set(weights), config, model_dir)

    model = Transformer(config)
    if config.extra.get("quantization"):
        # Swap in quantized layers where the checkpoint has scales (mlx-lm's convention).
        def quantized_here(path: str, module: nn.Module) -> bool | dict:
            if f"{path}.scales" not in weights:
                return False
            group_size, bits = module_settings(config.extra, path)
            return {"group_size": group_size, "bits": bits}

        nn.quantize(model, class_predicate=quantized_here)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as err:  # unexpected tensors or shape mismatches
        raise ModelLoadError(f"{model_dir}: weights do not match config.json: {err}") from None
    mx.eval(model.parameters())
    return MLXCausalLM(model, max_seq_len, mlx_dtype)
