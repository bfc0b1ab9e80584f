"""Llama-family transformer in MLX (Llama 3.x, Mistral, SmolLM2, Qwen2/2.5, Qwen3).

The same model as backends/torch/model.py, written the mlx-lm way. Batch size one; attention
tensors are [1, heads, tokens, head_dim], the layout mx.fast.scaled_dot_product_attention takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from sts_edge.backend import VerificationObserver
from sts_edge.backends.mlx.attention import ScoreBuffer, attend
from sts_edge.backends.mlx.selection import LayerSets
from sts_edge.config import ModelConfig


@dataclass
class Reads:
    """What one forward's attention layers read beyond plain causal attention over the cache."""

    sets: LayerSets | None = None  # a verification pass with a sparse policy
    scores: ScoreBuffer | None = None  # a draft step: fold the attention into the round's scores
    observer: VerificationObserver | None = None  # a measurement: sees every layer's queries and keys


PLAIN = Reads()


class KVCache:
    """Preallocated keys and values [1, kv_heads, capacity, head_dim], written by position.

    The model's committed length says which rows are live, so rollback copies nothing.
    """

    def __init__(self, kv_heads: int, capacity: int, head_dim: int, dtype: mx.Dtype):
        self.keys = mx.zeros((1, kv_heads, capacity, head_dim), dtype=dtype)
        self.values = mx.zeros((1, kv_heads, capacity, head_dim), dtype=dtype)

    def write(self, start: int, k: mx.array, v: mx.array) -> None:
        """Store rows start..start+n."""
        end = start + k.shape[2]
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v

    def arrays(self) -> list[mx.array]:
        return [self.keys, self.values]


class QuantizedKVCache:
    """The draft's keys and values in 8 or 4 bits, group-wise affine along head_dim, rows quantized
    once as they are written (backends/torch/quantized_kv.py says why and how; this is the same
    rule in MLX's ops: per group of `group_size` a float32 scale and bias, per channel a float32
    centre set by the write at row 0, value = scale * q + bias + centre, decoded in float32)."""

    def __init__(self, kv_heads: int, capacity: int, head_dim: int, bits: int, dtype: mx.Dtype, group_size: int):
        self.bits, self.group_size, self.dtype = bits, group_size, dtype
        width, groups = head_dim * bits // 8, head_dim // group_size
        self.parts = {name: [mx.zeros((1, kv_heads, capacity, width), dtype=mx.uint8),
                             mx.zeros((1, kv_heads, capacity, groups), dtype=mx.float32),
                             mx.zeros((1, kv_heads, capacity, groups), dtype=mx.float32)] for name in ("k", "v")}
        self.centres = {name: mx.zeros((1, kv_heads, 1, head_dim), dtype=mx.float32) for name in ("k", "v")}

    def write(self, start: int, k: mx.array, v: mx.array) -> None:
        end = start + k.shape[2]
        for name, x in (("k", k), ("v", v)):
            if start == 0:  # a new prompt: every row after it is stale
                self.centres[name] = x.astype(mx.float32).mean(axis=2, keepdims=True)
            for buffer, part in zip(self.parts[name], self.quantize(x.astype(mx.float32) - self.centres[name])):
                buffer[:, :, start:end] = part

    def quantize(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        groups = x.reshape(*x.shape[:-1], -1, self.group_size)
        low, high = groups.min(-1, keepdims=True), groups.max(-1, keepdims=True)
        levels = (1 << self.bits) - 1
        scales = (high - low) / levels
        steps = mx.where(scales > 0, scales, 1.0)
        values = mx.clip(mx.round((groups - low) / steps), 0, levels).astype(mx.uint8).reshape(x.shape)
        if self.bits == 4:  # two to a byte, the even position in the low nibble
            values = values[..., 0::2] | (values[..., 1::2] << 4)
        return values, scales.squeeze(-1), low.squeeze(-1)

    def rows(self, length: int) -> tuple[mx.array, mx.array]:
        """Keys and values of rows 0..length, decoded: [1, kv_heads, length, head_dim]."""
        decoded = []
        for name in ("k", "v"):
            values, scales, biases = (part[:, :, :length] for part in self.parts[name])
            if self.bits == 4:
                values = mx.stack((values & 15, values >> 4), axis=-1).reshape(*values.shape[:-1], -1)
            groups = values.astype(mx.float32).reshape(*values.shape[:-1], -1, self.group_size)
            x = groups * scales[..., None] + biases[..., None]
            decoded.append((x.reshape(*values.shape[:-1], -1) + self.centres[name]).astype(self.dtype))
        return decoded[0], decoded[1]

    def arrays(self) -> list[mx.array]:
        return self.parts["k"] + self.parts["v"] + list(self.centres.values())


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.scale = self.head_dim**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        # mx.fast.rope takes rotation periods (1 / inverse frequency), llama3 scaling included.
        self._rope_periods = mx.array(1.0 / config.rope_inv_freq(), dtype=mx.float32)

    def __call__(self, x: mx.array, cache: KVCache | QuantizedKVCache, start: int, reads: Reads = PLAIN) -> mx.array:
        n = x.shape[1]
        q = self.q_proj(x).reshape(1, n, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(1, n, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(1, n, self.n_kv_heads, self.head_dim)
        if "q_norm" in self:  # Qwen3 normalises each head before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=None, scale=1.0, offset=start, freqs=self._rope_periods)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=None, scale=1.0, offset=start, freqs=self._rope_periods)
        cache.write(start, k, v)
        keys, values = cache.rows(start + n) if isinstance(cache, QuantizedKVCache) else (cache.keys, cache.values)
        sets = reads.sets.for_layer(self.layer, q, keys, self.scale) if reads.sets is not None else None
        out = attend(q, keys, values, start, self.scale, sets=sets, scores=reads.scores, layer=self.layer)
        if reads.observer is not None:
            keys = keys[0, :, : start + n]
            reads.observer.observe(self.layer, np.array(q[0].astype(mx.float32)), np.array(keys.astype(mx.float32)))
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(1, n, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, cache: KVCache, start: int, reads: Reads) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), cache, start, reads)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [Block(config, i) for i in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, caches: list[KVCache], start: int, all_logits: bool,
                 reads: Reads = PLAIN) -> mx.array:
        """Logits for `tokens` [n] placed at positions start..: [n, vocab], or [1, vocab]. `reads`
        says what the attention reads beyond the dense cache (verification sets, the draft's score
        collection, an observer)."""
        x = self.embed_tokens(tokens[None])
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cache, start, reads)
        x = self.norm(x if all_logits else x[:, -1:])
        logits = self.embed_tokens.as_linear(x) if self.config.tie_word_embeddings else self.lm_head(x)
        return logits[0]
