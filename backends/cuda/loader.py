"""Loading a model directory into the PyTorch model, and the CausalLM the core drives."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sts_edge.backend import check_forward
from sts_edge.backends.cuda.graphs import DecodeGraphs
from sts_edge.backends.cuda.model import ScoreCollection, Transformer
from sts_edge.config import ModelConfig
from sts_edge.errors import ModelLoadError
from sts_edge.mask import VerificationMask, units
from sts_edge.memory import process_peak, reset_process_peak
from sts_edge.quantization import dequantize, module_settings
from sts_edge.weights import check_complete, checkpoint_files, internal_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchCausalLM:
    """A Transformer with its KV cache and committed length (the CausalLM protocol)."""

    def __init__(self, model: Transformer, capacity: int):
        self.model = model
        self.config = model.config
        self.capacity = capacity
        self.device = model.embed_tokens.weight.device
        self._length = 0
        self._scores: ScoreCollection | None = None  # set while a draft round collects scores
        self._score_buffer: torch.Tensor | None = None  # kept across rounds, zeroed at each start
        model.prepare_decoding(capacity)
        # Decode-sized forwards replay CUDA graphs on a GPU (STS_EDGE_CUDA_GRAPHS=0 turns them off).
        self.graphs = DecodeGraphs(model, capacity) if os.environ.get("STS_EDGE_CUDA_GRAPHS", "1") != "0" else None

    @property
    def length(self) -> int:
        return self._length

    @torch.inference_mode()
    def forward(self, tokens: Sequence[int], all_logits: bool = False, mask: VerificationMask | None = None) -> np.ndarray:
        start, n = self._length, len(tokens)
        check_forward(start, n, self.capacity, mask)
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)
        if self.graphs is not None and self.graphs.accepts(start, n, mask):
            logits = self.graphs.run(ids, start, all_logits, mask, self._scores)
        else:
            logits = self.model(ids, start, all_logits, mask=mask, scores=self._scores)
        self._length = start + n
        return logits.float().cpu().numpy()

    def start_scores(self, granularity: str, aggregation: str) -> None:
        """Begin a round: zero the running scores and fold every forward's attention into them."""
        shape = (self.config.num_hidden_layers, units(self.config, granularity), self.capacity)
        if self._score_buffer is None or tuple(self._score_buffer.shape) != shape:
            self._score_buffer = torch.zeros(shape, dtype=torch.float32, device=self.device)
        else:
            self._score_buffer.zero_()
        self._scores = ScoreCollection(self._score_buffer, aggregation, granularity)

    def read_scores(self, context: int, on_device: bool = False) -> np.ndarray | torch.Tensor:
        """End a round: the scores [layers, units, context] of the first `context` positions.

        With `on_device` on a GPU they stay there: the whole running buffer [layers, units,
        capacity], valid until the next start_scores (columns from `context` on hold the round's
        own tokens), and the verification mask selects on the GPU.
        """
        if self._scores is None:
            raise RuntimeError("read_scores without start_scores")
        scores, self._scores = self._scores, None
        if on_device and self.device.type == "cuda":
            return scores.buffer
        return scores.buffer[:, :, :context].cpu().numpy()

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot roll back to {length}: {self._length} positions are committed")
        self._length = int(length)


def reset_peak_memory(device: str) -> None:
    """Start measuring peak memory afresh: the GPU's allocator on "cuda", the process on the CPU."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_process_peak()


def peak_memory(device: str) -> tuple[int, str]:
    """(bytes, what they measure) since the last reset."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated(), "GPU"
    return process_peak(), "process RSS"


def load_model(model_dir: Path, config: ModelConfig, *, device: str, max_seq_len: int, dtype: str | None) -> TorchCausalLM:
    torch_device = torch.device("cuda" if device == "cuda" else "cpu")
    if dtype is None:
        # bfloat16 halves memory traffic on GPUs; CPUs run float32 matmuls faster and exactly.
        dtype = "bfloat16" if device == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]

    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as checkpoint:
            for name in checkpoint.keys():
                mapped = internal_name(name, config)
                if mapped is None:
                    continue
                tensor = checkpoint.get_tensor(name)
                # Converted as read, so the file's copy and ours never both exist whole.
                state[mapped] = tensor.to(device=torch_device, dtype=torch_dtype) if tensor.is_floating_point() else tensor
    _dequantize_in_place(state, config, torch_device, torch_dtype)
    check_complete(set(state), config, model_dir)

    with torch.device("meta"):
        model = Transformer(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # shape mismatches: config.json and weights disagree
        raise ModelLoadError(f"{model_dir}: weights do not match config.json: {err}") from None
    # The model holds the weights now. Dropping the dict's references lets prepare_decoding stack
    # the projections one layer at a time instead of keeping a second copy of them all.
    del state
    return TorchCausalLM(model.eval(), max_seq_len)


def _dequantize_in_place(state: dict[str, torch.Tensor], config: ModelConfig, device: torch.device,
                         dtype: torch.dtype) -> None:
    """Replace each quantized `X.weight` (with `X.scales`, `X.biases`) by its decoded float weight."""
    for scales_name in [name for name in state if name.endswith(".scales")]:
        module = scales_name.removesuffix(".scales")
        settings = module_settings(config.extra, module)
        if settings is None:
            raise ModelLoadError(f"{module} is quantized but config.json has no 'quantization' block")
        packed, scales, biases = state.pop(module + ".weight"), state.pop(scales_name), state.pop(module + ".biases")
        decoded = dequantize(packed.numpy(), scales.float().numpy(), biases.float().numpy(), *settings)
        state[module + ".weight"] = torch.from_numpy(decoded).to(device=device, dtype=dtype)
