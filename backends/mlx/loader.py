"""Loading a model directory into the MLX model, and the CausalLM the core drives."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from sts_edge.backend import KV_GROUP_SIZE, BackendModel, ScoreSpec, VerificationObserver
from sts_edge.backends.mlx.attention import ScoreBuffer
from sts_edge.backends.mlx.model import KVCache, QuantizedKVCache, Reads, Transformer
from sts_edge.backends.mlx.sampling import MLXDistributions, choose
from sts_edge.backends.mlx.selection import LayerSets
from sts_edge.config import ModelConfig
from sts_edge.errors import ModelLoadError
from sts_edge.mask import VerificationPlan, units
from sts_edge.host import process_peak, reset_process_peak
from sts_edge.quantization import module_settings
from sts_edge.sampling import SamplingParams
from sts_edge.weights import check_complete, checkpoint_files, internal_name

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def metal_available() -> bool:
    return mx.metal.is_available()


class MLXModel(BackendModel):
    """A Transformer with its KV caches, on Apple silicon's GPU through Metal, or the CPU."""

    def __init__(self, model: Transformer, capacity: int, dtype: mx.Dtype, kv_bits: int = 16):
        super().__init__(model.config, capacity)
        self.model = model
        c = model.config
        self.caches = [KVCache(c.num_key_value_heads, capacity, c.head_dim, dtype) if kv_bits == 16 else
                       QuantizedKVCache(c.num_key_value_heads, capacity, c.head_dim, kv_bits, dtype,
                                        min(KV_GROUP_SIZE, c.head_dim)) for _ in range(c.num_hidden_layers)]
        bits = sorted({m.bits for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)})
        name = str(dtype).removeprefix("mlx.core.")
        kv = f", int{kv_bits} KV" if kv_bits != 16 else ""
        self.precision = f"{'+'.join(f'int{b}' for b in bits) or name} weights, {name} activations{kv}"

    def _forward(self, tokens: list[int] | mx.array, start: int, last_only: bool, *, scores: ScoreBuffer | None = None,
                 plan: VerificationPlan | None = None, draft_scores: ScoreBuffer | None = None,
                 observer: VerificationObserver | None = None) -> mx.array:
        sets = None
        if plan is not None and not plan.policy.is_dense_at(start):
            sets = LayerSets(plan, start, units(self.config, plan.policy.granularity),
                             draft_scores.buffer if draft_scores is not None else None)
        ids = tokens if isinstance(tokens, mx.array) else mx.array(tokens, dtype=mx.int32)
        logits = self.model(ids, self.caches, start, not last_only, Reads(sets=sets, scores=scores, observer=observer))
        # Start the cache (and score) writes with the logits, so that the lazy graph never outlives
        # one step, without waiting for them: a draft round's steps queue one after another and the
        # host waits once, for its tokens.
        mx.async_eval(logits, [c.arrays() for c in self.caches], scores.buffer if scores is not None else [])
        return logits

    def _distributions(self, logits: mx.array, sampling: SamplingParams, vocab: int | None) -> MLXDistributions:
        return MLXDistributions(logits, sampling, vocab)

    def _choose(self, logits: mx.array, sampling: SamplingParams, uniform: float | None) -> mx.array:
        return choose(logits, sampling, uniform)

    def _concat(self, logits_list: list[mx.array]) -> mx.array:
        return mx.concatenate(logits_list)

    def _new_scores(self, spec: ScoreSpec) -> ScoreBuffer:
        shape = (self.config.num_hidden_layers, units(self.config, spec.granularity), self.capacity)
        return ScoreBuffer(mx.zeros(shape, dtype=mx.float32), spec)


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


def load_model(model_dir: Path, config: ModelConfig, *, device: str, max_seq_len: int, dtype: str | None,
               threads: int | None = None, kv_bits: int = 16) -> MLXModel:
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
    return MLXModel(model, max_seq_len, mlx_dtype, kv_bits)
