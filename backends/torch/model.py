"""Llama-family transformer in PyTorch (Llama 3.x, Mistral, SmolLM2, Qwen2/2.5, Qwen3).

Batch size one. Module names mirror the Hugging Face checkpoints (minus the leading `model.`),
so loading is a plain state-dict assignment. Activations are [tokens, ...]; attention tensors
are [heads, tokens, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sts_edge.backend import KV_GROUP_SIZE, VerificationObserver
from sts_edge.backends.torch.attention import ScoreBuffer, attend, use_kernels
from sts_edge.backends.torch.quantized import QuantizedEmbedding, QuantizedLinear, fuse_quantized
from sts_edge.backends.torch.quantized_kv import QuantizedKVCache
from sts_edge.backends.torch.selection import LayerSets
from sts_edge.config import ModelConfig

try:  # the fused per-token kernels of the GPU path (Triton); see Transformer.forward
    from sts_edge.triton_kernels.layer_ops import rms_norm, rope_and_cache, silu_mul
except ImportError:
    rms_norm = rope_and_cache = silu_mul = None


@dataclass
class Reads:
    """What one forward's attention layers read beyond plain causal attention over the cache."""

    sets: LayerSets | None = None  # a verification pass with a sparse policy
    scores: ScoreBuffer | None = None  # a draft step: fold the attention into the round's scores
    observer: VerificationObserver | None = None  # a measurement: sees every layer's queries and keys


PLAIN = Reads()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, as the reference implementations do, then scale in the model dtype.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys and values [kv_heads, capacity, head_dim], written by position.

    The cache itself keeps no length: the model's committed length says which rows are live,
    so rolling back is forgetting a number.
    """

    def __init__(self, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("k", torch.zeros(kv_heads, capacity, head_dim, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(kv_heads, capacity, head_dim, dtype=dtype, device=device), persistent=False)

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [kv_heads, n, head_dim] at rows start..start+n (the plain path; the GPU
        path writes them in layer_ops.rope_and_cache)."""
        self.k[:, start : start + k.shape[1]] = k
        self.v[:, start : start + k.shape[1]] = v


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [heads, n, head_dim] by the position tables [n, head_dim // 2] (rotate-half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.cache: KVCache | None = None
        self.qkv: nn.Module | None = None  # [q; k; v] as one product (fuse_projections)

    def fuse_projections(self) -> None:
        self.qkv = fuse_layers(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int | torch.Tensor,
                reads: Reads = PLAIN, bound: int | None = None, kernels: bool = False) -> torch.Tensor:
        """Attention of x [n, hidden] at positions start..start+n; cos/sin are the rotary tables
        of those positions, or with `kernels` the whole tables (the kernel indexes them)."""
        n = x.shape[0]
        quantized_cache = isinstance(self.cache, QuantizedKVCache)
        # One matrix product for q, k, v; one kernel for the norms, rotation, cache write. A quantized
        # cache's first write (row 0, a host int) sets its centres: that one goes the plain way.
        first_write = not isinstance(start, torch.Tensor) and start == 0
        if kernels and (not quantized_cache or (self.cache.kernel_writes() and not first_write)):
            norms = dict(q_norm=self.q_norm.weight, k_norm=self.k_norm.weight, eps=self.q_norm.eps) \
                if hasattr(self, "q_norm") else {}
            qkv = self.qkv(x)
            cache_k, cache_v = self.cache.kernel_rows() if quantized_cache else (self.cache.k, self.cache.v)
            q = rope_and_cache(qkv, cos, sin, cache_k, cache_v, start, self.n_heads, **norms)
        else:
            q, k, v = self.qkv(x).split([self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
                                         self.n_kv_heads * self.head_dim], dim=-1)
            q = q.reshape(n, self.n_heads, self.head_dim)
            k = k.reshape(n, self.n_kv_heads, self.head_dim)
            v = v.reshape(n, self.n_kv_heads, self.head_dim)
            if hasattr(self, "q_norm"):  # Qwen3 normalises each head before the rotation
                q, k = self.q_norm(q), self.k_norm(k)
            if kernels:  # the whole tables: this block's rows of them (start may be a device tensor)
                positions = start + torch.arange(n, device=x.device)
                cos, sin = cos[positions], sin[positions]
            q = apply_rope(q.transpose(0, 1), cos, sin)
            self.cache.write(start, apply_rope(k.transpose(0, 1), cos, sin), v.transpose(0, 1))
        # The kernels decode quantized rows as they read them, for dense reads and for sets of one
        # list per KV head chosen without the keys (a sparse draft step's).
        kernel_reads = reads.sets is None or (not reads.sets.reads_keys and reads.sets.plan.policy.granularity == "kv")
        if quantized_cache and kernels and kernel_reads and reads.observer is None:
            cache_k, cache_v = self.cache.kernel_rows()
        elif quantized_cache:  # the live rows decoded (a CUDA graph's: up to its bound)
            length = (bound if isinstance(start, torch.Tensor) else start) + n
            cache_k, cache_v = self.cache.rows(min(length, self.cache.capacity))
        else:
            cache_k, cache_v = self.cache.k, self.cache.v
        sets = reads.sets.for_layer(self.layer, q, cache_k) if reads.sets is not None else None
        scores = (reads.scores.buffer[self.layer], reads.scores.spec) if reads.scores is not None else None
        out = attend(q, cache_k, cache_v, start, sets=sets, scores=scores, bound=bound, kernels=kernels)
        if reads.observer is not None:
            reads.observer.observe(self.layer, q.float().cpu().numpy(), cache_k[:, : start + n].float().cpu().numpy())
        return self.o_proj(out.transpose(0, 1).reshape(n, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up: nn.Module | None = None  # [gate; up] as one product (fuse_projections)

    def fuse_projections(self) -> None:
        self.gate_up = fuse_layers(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor, kernels: bool = False) -> torch.Tensor:
        if kernels:
            return self.down_proj(silu_mul(self.gate_up(x)))
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class StackedLinear(nn.Module):
    """Several linears' weights stacked into one product; the linears keep views of it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class SeparateLinears(nn.Module):
    """Linears of different formats (a checkpoint may quantize q, k and v differently): run one by one."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = list(layers)  # not registered again: they are their parents' modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in self.layers], dim=-1)


def fuse_layers(*layers: nn.Module) -> nn.Module:
    """One layer stacking the layers' outputs, so that every forward reads them in one matrix product
    instead of several small ones. Nothing is stored twice: float linears keep views of the stacked
    weight; quantized ones give theirs up."""
    if all(isinstance(layer, QuantizedLinear) for layer in layers):
        fused = fuse_quantized(*layers)
        return fused if fused is not None else SeparateLinears(*layers)
    if not all(isinstance(layer, nn.Linear) for layer in layers):
        return SeparateLinears(*layers)
    with torch.no_grad():
        weight = torch.cat([layer.weight for layer in layers])
        has_bias = layers[0].bias is not None
        bias = torch.cat([layer.bias for layer in layers]) if has_bias else None
        row = 0
        for layer in layers:
            rows = layer.weight.shape[0]
            layer.weight.data = weight[row : row + rows]
            if has_bias:
                layer.bias.data = bias[row : row + rows]
            row += rows
    return StackedLinear(weight, bias)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int, reads: Reads) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start, reads)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_kernels(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                        start: int | torch.Tensor, reads: Reads, bound: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The GPU path, where each residual add runs in the kernel of the norm after it: x is the
        previous layer's output not yet added to `residual` (None before the first layer), and
        this returns its own output and residual in the same form."""
        norm = self.input_layernorm
        if residual is None:  # the first layer: the embeddings are the residual stream
            normed, residual = rms_norm(x, norm.weight, norm.eps), x
        else:
            normed, residual = rms_norm(x, norm.weight, norm.eps, residual)
        x = self.self_attn(normed, cos, sin, start, reads, bound, kernels=True)
        norm = self.post_attention_layernorm
        normed, residual = rms_norm(x, norm.weight, norm.eps, residual)
        return self.mlp(normed, kernels=True), residual


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def prepare_decoding(self, capacity: int, quantized_products: torch.dtype | None = None, kv_bits: int = 16) -> None:
        """Allocate the KV caches and the rotary tables for `capacity` positions, and fuse the
        projections that the GPU path runs as one matrix product (after the weights are loaded).
        Quantized layers multiply in `quantized_products` (default: the model's dtype; on the CPU
        INT8_PRODUCTS rounds 4-bit layers' activations to int8: backends/torch/quantized.py).
        `kv_bits` 8 or 4 quantizes the cache (a draft's: backends/torch/quantized_kv.py)."""
        c, weight = self.config, self.norm.weight  # the model dtype and device (embeddings may be packed)
        products = quantized_products or weight.dtype
        for module in self.modules():
            if isinstance(module, QuantizedEmbedding):
                module.repack(weight.dtype, as_head=c.tie_word_embeddings, products=products)
            elif isinstance(module, QuantizedLinear):  # into the kernel's layout, once
                module.repack(products)
        for layer in self.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()
            layer.self_attn.cache = KVCache(c.num_key_value_heads, capacity, c.head_dim, weight.dtype, weight.device) \
                if kv_bits == 16 else QuantizedKVCache(c.num_key_value_heads, capacity, c.head_dim, kv_bits, weight.dtype,
                                                       weight.device, min(KV_GROUP_SIZE, c.head_dim))
        inv_freq = torch.tensor(c.rope_inv_freq(), dtype=torch.float64, device=weight.device)
        angles = torch.arange(capacity, dtype=torch.float64, device=weight.device)[:, None] * inv_freq
        self.rope_cos = angles.cos().to(weight.dtype)
        self.rope_sin = angles.sin().to(weight.dtype)

    def forward(self, tokens: torch.Tensor, start: int | torch.Tensor, all_logits: bool, reads: Reads = PLAIN,
                bound: int | None = None) -> torch.Tensor:
        """Logits for `tokens` [n] placed at positions start..start+n: [n, vocab], or [1, vocab].

        `reads` says what the attention reads beyond the dense cache (verification sets, the
        draft's score collection, an observer). `start` may be a one-element device tensor, with
        `bound` >= start: the form a CUDA graph captures (GPU kernels only; graphs.py).
        """
        n, weight = tokens.shape[0], self.norm.weight
        # Decode-sized blocks on a GPU (and every graph-captured forward) take the Triton kernels,
        # fused norms and projections included; prefill and the CPU take the plain paths.
        kernels = isinstance(start, torch.Tensor) or use_kernels(weight.device, weight.dtype, n, self.config.head_dim)
        x = self.embed_tokens(tokens)
        if kernels:
            residual = None
            for layer in self.layers:
                x, residual = layer.forward_kernels(x, residual, self.rope_cos, self.rope_sin, start, reads, bound)
            if not all_logits:
                x, residual = x[-1:], residual[-1:]
            x, _ = rms_norm(x, self.norm.weight, self.norm.eps, residual)
        else:
            cos, sin = self.rope_cos[start : start + n], self.rope_sin[start : start + n]
            for layer in self.layers:
                x = layer(x, cos, sin, start, reads)
            x = self.norm(x if all_logits else x[-1:])
        if not self.config.tie_word_embeddings:
            return self.lm_head(x)
        if hasattr(self.embed_tokens, "as_linear"):  # quantized embeddings
            return self.embed_tokens.as_linear(x)
        return F.linear(x, self.embed_tokens.weight)
