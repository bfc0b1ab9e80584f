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

from sts_edge.backends.cuda.attention import (
    attend,
    attend_and_score,
    csr_offsets,
    draft_attention_with_scores,
    sparse_attend,
    split_attention,
    use_kernels,
)
from sts_edge.config import ModelConfig
from sts_edge.mask import VerificationMask


@dataclass
class ScoreCollection:
    """The draft's running attention scores for one round: [layers, units, capacity] float32."""

    buffer: torch.Tensor
    aggregation: str  # "max" or "sum"
    granularity: str  # "kv" or "query"


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

    def write(self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Store rows start..start+n and return the live rows 0..start+n.

        `start` may be a device tensor (inside a CUDA graph): the rows are then written by index
        and nothing is returned, since the live length is only known on the device.
        """
        if isinstance(start, torch.Tensor):
            positions = start + torch.arange(k.shape[1], device=start.device)
            self.k.index_copy_(1, positions, k)
            self.v.index_copy_(1, positions, v)
            return None
        end = start + k.shape[1]
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        return self.k[:, :end], self.v[:, :end]


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

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: int | torch.Tensor,
        mask: VerificationMask | None = None,
        scores: ScoreCollection | None = None,
        bound: int | None = None,
    ) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):  # Qwen3 normalises each head before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(0, 1), cos, sin)
        k = apply_rope(k.transpose(0, 1), cos, sin)
        live = self.cache.write(start, k, v.transpose(0, 1))
        if live is None:  # a device-side start (CUDA graph): the kernels read the position there
            return self.o_proj(self._graphed_attention(q, start, bound, mask, scores).transpose(0, 1).reshape(n, -1))
        keys, values = live
        indices = None
        if mask is not None:  # a verification block: ask the policy for this layer's sets
            qk = (q.float().cpu().numpy(), keys.float().cpu().numpy()) if mask.needs_queries else ()
            indices = mask.sets_for(self.layer, *qk)
        # On a GPU, decode-sized blocks go through the Triton kernels (triton_kernels/); prefill and
        # the CPU take the plain paths, which are also the kernels' references.
        kernels = use_kernels(q)
        if indices is not None:
            rows = torch.as_tensor(indices, device=q.device)
            if kernels and rows.shape[0] == self.n_kv_heads:  # one set per KV head: the kernel's layout
                out = split_attention(q, self.cache.k, self.cache.v, start, rows.to(torch.int32).flatten(),
                                      csr_offsets(self.n_kv_heads, rows.shape[1], q.device), rows.shape[1], check=False)
            else:
                out = sparse_attend(q, self.cache.k, self.cache.v, start, rows.long())
        elif scores is not None:  # a draft step: also fold attention into the round's scores
            if kernels:
                out = draft_attention_with_scores(q, self.cache.k, self.cache.v, start, scores.buffer[self.layer],
                                                  scores.aggregation, scores.granularity, check=False)
            else:
                out = attend_and_score(q, keys, values, start, scores.buffer[self.layer], scores.aggregation,
                                       scores.granularity)
        elif kernels and start > 0:
            out = split_attention(q, self.cache.k, self.cache.v, start, check=False)
        else:
            out = attend(q, keys, values, start)  # [heads, n, head_dim]
        return self.o_proj(out.transpose(0, 1).reshape(n, self.n_heads * self.head_dim))

    def _graphed_attention(self, q: torch.Tensor, start: torch.Tensor, bound: int, mask, scores) -> torch.Tensor:
        """The kernel paths with the position on the device; `mask` gives device sets or None."""
        indices = mask.sets_for(self.layer) if mask is not None else None
        if indices is not None:
            return split_attention(q, self.cache.k, self.cache.v, start, indices.flatten(),
                                   csr_offsets(self.n_kv_heads, indices.shape[1], q.device), indices.shape[1],
                                   bound=bound, check=False)
        if scores is not None:
            return draft_attention_with_scores(q, self.cache.k, self.cache.v, start, scores.buffer[self.layer],
                                               scores.aggregation, scores.granularity, bound=bound, check=False)
        return split_attention(q, self.cache.k, self.cache.v, start, bound=bound, check=False)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int | torch.Tensor,
                **attention) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start, **attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def setup_cache(self, capacity: int) -> None:
        """Allocate the KV caches and the rotary tables for `capacity` positions."""
        c, weight = self.config, self.embed_tokens.weight
        for layer in self.layers:
            layer.self_attn.cache = KVCache(c.num_key_value_heads, capacity, c.head_dim, weight.dtype, weight.device)
        inv_freq = torch.tensor(c.rope_inv_freq(), dtype=torch.float64, device=weight.device)
        angles = torch.arange(capacity, dtype=torch.float64, device=weight.device)[:, None] * inv_freq
        self.rope_cos = angles.cos().to(weight.dtype)
        self.rope_sin = angles.sin().to(weight.dtype)

    def forward(
        self,
        tokens: torch.Tensor,
        start: int | torch.Tensor,
        all_logits: bool,
        mask: VerificationMask | None = None,
        scores: ScoreCollection | None = None,
        bound: int | None = None,
    ) -> torch.Tensor:
        """Logits for `tokens` [n] placed at positions start..start+n: [n, vocab], or [1, vocab].

        With `mask`, the tokens are a verification block and each layer reads the sets the mask
        policy gives it; with `scores`, the attention probabilities are folded into them.
        `start` may be a one-element device tensor, with `bound` >= start: the form a CUDA graph
        captures (GPU kernels only; graphs.py's DecodeGraphs).
        """
        if isinstance(start, torch.Tensor):
            positions = start + torch.arange(tokens.shape[0], device=start.device)
            cos, sin = self.rope_cos.index_select(0, positions), self.rope_sin.index_select(0, positions)
        else:
            end = start + tokens.shape[0]
            cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, start, mask=mask, scores=scores, bound=bound)
        x = self.norm(x if all_logits else x[-1:])
        head = self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return F.linear(x, head)
