"""Loading a model directory into the PyTorch model, and the CausalLM the core drives."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from sts_edge.backend import PREFILL_CHUNK, BackendModel, ScoreSpec, VerificationObserver
from sts_edge.backends.torch.attention import ScoreBuffer
from sts_edge.backends.torch.graphs import DecodeGraphs
from sts_edge.backends.torch.model import Reads, Transformer
from sts_edge.backends.torch.quantized import (INT8_PRODUCTS, CpuAffineWeight, Int4PackWeight, QuantizedLinear,
                                               cpu_kernel_reads, int4pack_readable, swap_in_quantized)
from sts_edge.backends.torch.sampling import TorchDistributions, choose
from sts_edge.backends.torch.selection import LayerSets
from sts_edge.config import ModelConfig
from sts_edge.cpu_kernels.extension import unavailable_reason as cpu_kernel_missing
from sts_edge.errors import ModelLoadError
from sts_edge.mask import VerificationPlan, units
from sts_edge.host import cpu_threads, map_large_allocations, process_peak, release_freed_memory, reset_process_peak
from sts_edge.quantization import dequantize, module_settings
from sts_edge.sampling import SamplingParams
from sts_edge.weights import check_complete, checkpoint_files, internal_name

try:  # the GPU's quantized matrix product (Triton)
    from sts_edge.triton_kernels.quantized_matmul import BITS as QUANTIZED_BITS
    from sts_edge.triton_kernels.quantized_matmul import GROUP_SIZES as QUANTIZED_GROUP_SIZES
except ImportError:
    QUANTIZED_BITS = QUANTIZED_GROUP_SIZES = ()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchModel(BackendModel):
    """A Transformer with its KV cache, on a GPU ("cuda") or the CPU ("torch-cpu")."""

    def __init__(self, model: Transformer, capacity: int, quantized_products: torch.dtype | None = None,
                 kv_bits: int = 16):
        super().__init__(model.config, capacity)
        self.model = model
        self.device = model.norm.weight.device
        self._score_buffers: dict[ScoreSpec, ScoreBuffer] = {}  # reused by every round: graphs keep their pointers
        self._eager_reasons: set[str] = set()
        model.prepare_decoding(capacity, quantized_products, kv_bits)
        # Decode-sized forwards replay CUDA graphs on a GPU (STS_EDGE_CUDA_GRAPHS=0 turns them off).
        graphs = self.device.type == "cuda" and os.environ.get("STS_EDGE_CUDA_GRAPHS", "1") != "0"
        self.graphs = DecodeGraphs(model, capacity) if graphs else None
        bits = sorted({m.bits for m in model.modules() if isinstance(m, QuantizedLinear) and m.packed is not None})
        dtype = str(model.norm.weight.dtype).removeprefix("torch.")
        threads = f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""
        products = " (bfloat16 products)" if dtype != "bfloat16" and any(
            isinstance(m, QuantizedLinear) and isinstance(m.packed, Int4PackWeight)
            and m.packed.scales_and_zeros.dtype == torch.bfloat16 for m in model.modules()) else ""
        int8_layers = [m.packed for m in model.modules() if isinstance(m, QuantizedLinear)
                       and isinstance(m.packed, CpuAffineWeight) and m.packed.int8_activations]
        if int8_layers:
            products = " (int8 activation products, AMX)" if any(layer.amx for layer in int8_layers) \
                else " (int8 activation products)"
        if self.device.type == "cpu" and bits and cpu_kernel_missing():
            products += f" (PyTorch's kernels: {cpu_kernel_missing()})"
        kv = f", int{kv_bits} KV" if kv_bits != 16 else ""
        self.precision = f"{'+'.join(f'int{b}' for b in bits) or dtype} weights{products}, {dtype} activations{kv}{threads}"
        if self.device.type == "cpu":
            # Half the default: a chunk's activations and attention weights are a visible share of
            # the demo pair's peak resident memory, and the CPU's products are no faster per row
            # at 512 rows than at 256 (benchmarks/README.md, the CPU path).
            self.prefill_chunk = PREFILL_CHUNK // 2

    @torch.inference_mode()
    def _forward(self, tokens: list[int] | torch.Tensor, start: int, last_only: bool, *, scores: ScoreBuffer | None = None,
                 plan: VerificationPlan | None = None, draft_scores: ScoreBuffer | None = None,
                 observer: VerificationObserver | None = None) -> torch.Tensor:
        ids = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(tokens, dtype=torch.long, device=self.device)
        if plan is not None and plan.policy.is_dense_at(start):
            plan = None  # the whole context fits the sets: plain dense verification
        elif plan is not None:
            plan = plan.at(start)  # a graph is captured for the selection that runs at this length
        if self.graphs is not None and observer is None:
            if self.graphs.accepts(start, len(tokens), plan, draft_scores):
                # The graph's output buffer is rewritten by its next replay (the next draft step): a copy
                # is what the caller keeps.
                return self.graphs.run(ids, start, not last_only, plan, draft_scores, scores).clone()
            self._note_eager(start, len(tokens), plan)
        sets = None
        if plan is not None:
            sets = LayerSets(plan, start, units(self.config, plan.policy.granularity),
                             draft_scores.buffer if draft_scores is not None else None)
        return self.model(ids, start, not last_only, Reads(sets=sets, scores=scores, observer=observer))

    def _distributions(self, logits: torch.Tensor, sampling: SamplingParams, vocab: int | None) -> TorchDistributions:
        return TorchDistributions(logits, sampling, vocab)

    @torch.inference_mode()
    def _choose(self, logits: torch.Tensor, sampling: SamplingParams, uniform: float | None) -> torch.Tensor:
        return choose(logits, sampling, uniform)

    def _concat(self, logits_list: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(logits_list)

    def _new_scores(self, spec: ScoreSpec) -> ScoreBuffer:
        buffer = self._score_buffers.get(spec)
        if buffer is None:
            shape = (self.config.num_hidden_layers, units(self.config, spec.granularity), self.capacity)
            buffer = self._score_buffers[spec] = ScoreBuffer(torch.zeros(shape, dtype=torch.float32, device=self.device), spec)
        else:
            buffer.buffer.zero_()
        return buffer

    def _note_eager(self, start: int, n: int, plan: VerificationPlan | None) -> None:
        """Say once why a decode-sized verification on the GPU runs eagerly instead of replaying a graph."""
        if plan is None or self.device.type != "cuda" or n > 16 or start == 0:
            return
        policy = plan.policy
        reason = ("the policy is not sts" if policy.name != "sts" else "the budget is a share of the context"
                  if policy.budget < 1 else "sets are per query head" if policy.granularity != "kv" else "")
        if reason and reason not in self._eager_reasons:
            self._eager_reasons.add(reason)
            warnings.warn(f"verification runs without CUDA graphs because {reason}: slower per round "
                          "(graphs take sts with a token-count budget and one set per KV head)", stacklevel=2)


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


def auto_device() -> str:
    """"cuda" where a GPU and a CUDA build of torch are present, else "torch-cpu"."""
    return "cuda" if torch.cuda.is_available() else "torch-cpu"


def cpu_dtype() -> str:
    """bfloat16 where the CPU multiplies it natively (AVX-512 BF16, AMX), float32 elsewhere, where
    bfloat16 matrix products and attention are emulated and several times slower than float32
    ones (4-bit layers still multiply in bfloat16 there: see load_model). STS_EDGE_CPU_DTYPE
    overrides."""
    if os.environ.get("STS_EDGE_CPU_DTYPE"):
        return os.environ["STS_EDGE_CPU_DTYPE"]
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bfloat16" if native else "float32"


def load_model(model_dir: Path, config: ModelConfig, *, device: str, max_seq_len: int, dtype: str | None,
               threads: int | None = None, kv_bits: int = 16) -> TorchModel:
    torch_device = torch.device("cuda" if device == "cuda" else "cpu")
    if device != "cuda":
        count = cpu_threads(threads)
        if count is not None:
            torch.set_num_threads(count)
        map_large_allocations()
    # Where our CPU kernel cannot run, 4-bit layers fall back to PyTorch's CPU int4 kernel, whose
    # float32 path is a plain loop several times slower than its bfloat16 one even where bfloat16 is
    # emulated (AVX2; benchmarks/README.md): unless a dtype is passed (float32 then means exact
    # products, what tests comparing with references ask for), they multiply in bfloat16 there.
    # With our kernel, by default 4-bit layers round decode-sized activations to int8 per group
    # (INT8_PRODUCTS; the kernel's comments say why); a dtype passed means float32 products there.
    products = None
    if device != "cuda" and dtype is None:
        products = torch.bfloat16 if cpu_kernel_missing() else INT8_PRODUCTS
    if dtype is None:
        # bfloat16 halves memory traffic on GPUs; on CPUs it depends on the instruction set.
        dtype = "bfloat16" if device == "cuda" else cpu_dtype()
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]

    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as checkpoint:
            names = list(checkpoint.keys())
        for name in names:
            mapped = internal_name(name, config)
            if mapped is None:
                continue
            # One mapping of the file per tensor: a mapped page counts as resident until the mapping
            # closes, so reading a 2 GB shard through one mapping would hold all of it at once. Each
            # tensor is converted as it is read: the file's copy and ours never both exist whole.
            with safe_open(str(path), framework="pt") as checkpoint:
                tensor = checkpoint.get_tensor(name)
            # On the CPU quantization scales and biases stay in the checkpoint's dtype, which our
            # kernel reads: in float32 they would add half again to a 4-bit layer's bytes.
            keep = not tensor.is_floating_point() or (device != "cuda" and name.endswith((".scales", ".biases")))
            state[mapped] = tensor.to(device=torch_device) if keep else tensor.to(device=torch_device, dtype=torch_dtype)
    kept = _quantized_modules(state, config, torch_device, torch_dtype)
    check_complete(set(state), config, model_dir)

    with torch.device("meta"):
        model = Transformer(config)
    swap_in_quantized(model, kept)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # shape mismatches: config.json and weights disagree
        raise ModelLoadError(f"{model_dir}: weights do not match config.json: {err}") from None
    # The model holds the weights now. Dropping the dict's references lets prepare_decoding stack
    # the projections one layer at a time instead of keeping a second copy of them all.
    del state
    loaded = TorchModel(model.eval(), max_seq_len, products, kv_bits)
    if device != "cuda":
        release_freed_memory()
    return loaded


def keeps_packed(device: torch.device, dtype: torch.dtype, module: str, bits: int, group_size: int, inputs: int,
                 outputs: int, tied: bool) -> bool:
    """Whether a quantized layer stays packed rather than decoded at load: on a GPU wherever our
    kernel reads it; on the CPU where our kernel does, else where PyTorch's int4 kernel does (the
    embedding table is decoded row by row as it is looked up, and needs a kernel only as a tied LM
    head)."""
    if device.type == "cuda":
        return bits in QUANTIZED_BITS and group_size in QUANTIZED_GROUP_SIZES
    if module == "embed_tokens" and not tied:
        return bits in (4, 8)
    return cpu_kernel_reads(bits, group_size, inputs) or int4pack_readable(device, bits, group_size, inputs, outputs, dtype)


def _quantized_modules(state: dict[str, torch.Tensor], config: ModelConfig, device: torch.device,
                       dtype: torch.dtype) -> dict[str, tuple[int, int]]:
    """Keep each quantized layer (`X.weight` packed, `X.scales`, `X.biases`) packed where a kernel
    reads its format (`keeps_packed`), and decode the others to `dtype` in place; returns {path:
    (group_size, bits)} of those kept."""
    kept = {}
    for scales_name in [name for name in state if name.endswith(".scales")]:
        module = scales_name.removesuffix(".scales")
        settings = module_settings(config.extra, module)
        if settings is None:
            raise ModelLoadError(f"{module} is quantized but config.json has no 'quantization' block")
        packed = state[module + ".weight"]
        if packed.dtype not in (torch.uint32, torch.int32):
            raise ModelLoadError(f"{module}.weight has scales but is {packed.dtype}, not packed uint32")
        group_size, bits = settings
        outputs, inputs = packed.shape[0], packed.shape[1] * 32 // bits
        if keeps_packed(device, dtype, module, bits, group_size, inputs, outputs, config.tie_word_embeddings):
            state[module + ".weight"] = packed.view(torch.int32).to(device)
            kept[module] = settings
            continue
        scales, biases = state.pop(scales_name), state.pop(module + ".biases")
        decoded = dequantize(state.pop(module + ".weight").view(torch.int32).numpy().view(np.uint32),
                             scales.float().cpu().numpy(), biases.float().cpu().numpy(), group_size, bits)
        state[module + ".weight"] = torch.from_numpy(decoded).to(device=device, dtype=dtype)
    return kept
