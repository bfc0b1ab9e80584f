"""The mask policy: which context tokens each target layer and head reads while verifying.

Everything here is numpy and backend-agnostic. A backend asks, layer by layer, for the index sets
of the verification block (`VerificationMask.sets_for`); policies that need the target's own
queries and keys (oracle, quest) get them through that call, the others ignore them.

Every set is the union of `sink` tokens at the start, a `window` of the most recent tokens, and
the `budget` best-scoring tokens in between; it is sorted, unique and inside the committed
context. When budget + sink + window covers the context, the layer runs dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sts_edge.config import ModelConfig

POLICIES = ("dense", "sts", "oracle", "streaming", "quest")
AGGREGATIONS = ("max", "sum")
GRANULARITIES = ("kv", "query")  # one set per target KV head, or per target query head


class MaskPolicyError(ValueError):
    """A policy setting that cannot work; the message names the setting and the valid range."""


@dataclass(frozen=True)
class MaskPolicy:
    name: str = "sts"
    budget: float = 512  # tokens chosen by score: >= 1 is a count, in (0, 1) a fraction of the context
    sink: int = 4  # first tokens always kept (attention sinks)
    window: int = 64  # most recent context tokens always kept
    dense_layers: tuple[int, ...] = ()  # target layers that always read the whole context
    aggregation: str = "max"  # over the draft's queries and the query heads of a group
    granularity: str = "kv"
    page_size: int = 16  # quest only

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise MaskPolicyError(f"unknown policy {self.name!r}; choose one of: {', '.join(POLICIES)}")
        if not (self.budget > 0 and np.isfinite(self.budget)) or (self.budget >= 1 and self.budget != int(self.budget)):
            raise MaskPolicyError(
                f"budget must be a whole number of tokens >= 1 or a fraction in (0, 1), got {self.budget}"
            )
        if self.sink < 0 or self.window < 0:
            raise MaskPolicyError(f"sink and window must be >= 0, got sink={self.sink} window={self.window}")
        if self.aggregation not in AGGREGATIONS:
            raise MaskPolicyError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.granularity not in GRANULARITIES:
            raise MaskPolicyError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.page_size < 1:
            raise MaskPolicyError(f"page_size must be >= 1, got {self.page_size}")

    def check_model(self, config: ModelConfig, capacity: int) -> None:
        """Settings that depend on the target model and its cache size."""
        bad = [layer for layer in self.dense_layers if not 0 <= layer < config.num_hidden_layers]
        if bad:
            raise MaskPolicyError(
                f"dense layers {bad} are outside the target's {config.num_hidden_layers} layers "
                f"(valid: 0..{config.num_hidden_layers - 1})"
            )
        if self.sink + self.window >= capacity:
            raise MaskPolicyError(
                f"sink ({self.sink}) + window ({self.window}) must be smaller than the KV cache ({capacity} tokens); "
                "lower them or load with a larger max_seq_len"
            )

    def budget_tokens(self, context: int) -> int:
        """The scored part of the budget for a context of `context` tokens."""
        if self.budget < 1:
            return max(1, int(self.budget * context))
        return int(self.budget)

    def kept_tokens(self, context: int) -> int:
        """Entries of every set: min(budget + sink + window, context)."""
        return min(self.budget_tokens(context) + self.sink + self.window, context)

    def is_dense_at(self, context: int) -> bool:
        return self.name == "dense" or self.kept_tokens(context) >= context


def select_indices(scores: np.ndarray, keep: int, sink: int, window: int) -> np.ndarray:
    """Sorted indices [units, keep] of the top `keep - sink - window` scores plus sink and window.

    scores: [units, context]. The reference selection every backend path is tested against.
    """
    units, context = scores.shape
    if keep >= context:
        return np.broadcast_to(np.arange(context, dtype=np.int64), (units, context)).copy()
    forced = np.zeros(context, dtype=bool)
    forced[:sink] = True
    forced[context - window :] = True
    ranked = np.where(forced, np.inf, np.nan_to_num(scores.astype(np.float64), nan=-np.inf, posinf=np.finfo(np.float64).max))
    chosen = np.argpartition(-ranked, keep - 1, axis=-1)[:, :keep]
    return np.sort(chosen, axis=-1)


# --- scores for each policy ------------------------------------------------------------------


def group_attention(q: np.ndarray, keys: np.ndarray, context: int, granularity: str) -> np.ndarray:
    """Dense attention probabilities of the verification block over the context, summed per unit.

    q: [heads, n, head_dim] (the block's queries, rotated); keys: [kv_heads, context + n, head_dim].
    Returns [units, context]: the attention mass each context position receives, summed over
    the block's queries (and over the query heads of a group at "kv" granularity). The block
    attends to itself causally, which enters the softmax normaliser.
    """
    heads, n, head_dim = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    qg = q.reshape(kv_heads, group, n, head_dim).astype(np.float64)
    logits = np.einsum("kgnd,kld->kgnl", qg, keys.astype(np.float64)) / np.sqrt(head_dim)
    causal = np.arange(context + n)[None, :] <= (context + np.arange(n))[:, None]
    logits = np.where(causal, logits, -np.inf)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    mass = probs[..., :context].sum(axis=2)  # [kv, group, context]
    return mass.sum(axis=1) if granularity == "kv" else mass.reshape(heads, context)


def quest_scores(q: np.ndarray, keys: np.ndarray, context: int, granularity: str, page_size: int) -> np.ndarray:
    """Quest: per page, the upper bound sum_d max(q_d * min_d, q_d * max_d) of q . k, per token.

    Every token of a page gets its page's score (max over the block's queries and the group's
    heads), so the top tokens are whole pages except possibly the last one picked.
    """
    heads, n, head_dim = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    pages = -(-context // page_size)
    padded = np.full((kv_heads, pages * page_size, head_dim), np.nan)
    padded[:, :context] = keys[:, :context]
    paged = padded.reshape(kv_heads, pages, page_size, head_dim)
    kmin, kmax = np.nanmin(paged, axis=2), np.nanmax(paged, axis=2)  # [kv, pages, d]
    qg = q.reshape(kv_heads, group, n, 1, head_dim).astype(np.float64)
    bound = np.maximum(qg * kmin[:, None, None], qg * kmax[:, None, None]).sum(-1)  # [kv, group, n, pages]
    bound = bound.max(axis=2)
    per_unit = bound.max(axis=1) if granularity == "kv" else bound.reshape(heads, pages)
    return np.repeat(per_unit, page_size, axis=-1)[:, :context]


def attention_recall(mass: np.ndarray, sets: np.ndarray | None) -> tuple[float, float]:
    """(mass inside the sets, total mass) of attention mass [units, context]; None means all."""
    total = float(mass.sum())
    inside = total if sets is None else float(np.take_along_axis(mass, sets, axis=-1).sum())
    return inside, total


@dataclass
class LayerHeadMap:
    """Which draft layer and draft head stand in for each target layer and head."""

    layer_map: np.ndarray  # [target_layers] -> draft layer
    head_map: np.ndarray  # [target_layers, target_units] -> draft unit in the mapped draft layer

    @classmethod
    def proportional(cls, target: ModelConfig, draft: ModelConfig, granularity: str) -> "LayerHeadMap":
        """f(t) = floor(t * L_d / L_t), and heads matched by index (scaled when counts differ)."""
        t_units, d_units = units(target, granularity), units(draft, granularity)
        layer_map = np.arange(target.num_hidden_layers) * draft.num_hidden_layers // target.num_hidden_layers
        head_map = np.broadcast_to(np.arange(t_units) * d_units // t_units, (target.num_hidden_layers, t_units))
        return cls(layer_map.astype(np.int64), head_map.astype(np.int64).copy())

    def layer_sets(self, draft_sets, layer: int):
        """Target `layer`'s sets from device sets of every draft layer [draft_layers, draft_units,
        keep]: its draft layer's, one per target unit by the head map (views, no host copies, so
        a CUDA graph can capture it)."""
        import torch

        sets = draft_sets[int(self.layer_map[layer])]
        heads = self.head_map[layer]
        if np.array_equal(heads, np.arange(sets.shape[0])):
            return sets
        return torch.stack([sets[int(h)] for h in heads])


def units(config: ModelConfig, granularity: str) -> int:
    return config.num_key_value_heads if granularity == "kv" else config.num_attention_heads


@dataclass
class VerificationMask:
    """The sets one verification pass uses, produced layer by layer on request of the backend.

    `draft_scores` [draft_layers, draft_units, >= context] comes from the draft's round (sts
    only; columns from `context` on are ignored): numpy, or a backend's device tensor, in which
    case the sets of every layer are selected there at the first request, in one batch
    (sts_edge.triton_kernels.selection), and returned as device tensors. The backend calls
    `sets_for(layer, q, keys)`; `needs_queries` tells it whether q and keys (numpy) are needed or
    None can be passed.
    """

    policy: MaskPolicy
    context: int  # committed tokens the sets index into; the verification block follows them
    target_units: int  # sets per layer: the target's KV heads or query heads, by granularity
    mapping: LayerHeadMap | None = None
    draft_scores: np.ndarray | None = None
    _device_sets: object = field(default=None, init=False, repr=False)  # [draft_layers, units, keep] on device
    kept_rows: int = field(default=0, init=False)  # context rows read over all layers (for sparsity stats)
    dense_rows: int = field(default=0, init=False)

    @property
    def needs_queries(self) -> bool:
        return self.policy.name in ("oracle", "quest") and not self.policy.is_dense_at(self.context)

    def count(self, layer: int) -> bool:
        """Count this layer's context rows into the sparsity stats; False when it runs dense."""
        policy, context = self.policy, self.context
        self.dense_rows += context
        if policy.is_dense_at(context) or layer in policy.dense_layers:
            self.kept_rows += context
            return False
        self.kept_rows += policy.kept_tokens(context)
        return True

    def sets_for(self, layer: int, q: np.ndarray | None = None, keys: np.ndarray | None = None) -> np.ndarray | None:
        """Sorted index sets [units, kept] for this target layer, or None to run it dense."""
        if not self.count(layer):
            return None
        policy, context = self.policy, self.context
        keep = policy.kept_tokens(context)
        if policy.name == "sts" and not isinstance(self.draft_scores, np.ndarray):
            return self._select_on_device(layer)
        if policy.name == "sts":
            draft_layer = self.mapping.layer_map[layer]
            scores = self.draft_scores[draft_layer][self.mapping.head_map[layer], :context]
        elif policy.name == "streaming":
            # Recency as the score: the budget extends the local window.
            scores = np.broadcast_to(np.arange(context, dtype=np.float64), (self.target_units, context))
        elif policy.name == "oracle":
            scores = group_attention(q, keys, context, policy.granularity)
        else:  # quest
            scores = quest_scores(q, keys, context, policy.granularity, policy.page_size)
        return select_indices(scores, keep, policy.sink, policy.window)

    def _select_on_device(self, layer: int):
        """Sets for `layer` from device scores. The first call selects the top-B of every draft
        layer and head in one batch; each target layer then takes its mapped draft layer's sets.
        Only device operations (no host-to-device copies), so a CUDA graph can capture it."""
        return self.mapping.layer_sets(self.device_sets(), layer)

    def device_sets(self):
        """The sets [draft_layers, draft_units, keep] of every draft layer and head, selected on the
        device on first use from device scores (sts only)."""
        if self._device_sets is None:
            from sts_edge.triton_kernels.selection import select_sets

            policy, context = self.policy, self.context
            self._device_sets = select_sets(self.draft_scores, context, policy.budget_tokens(context), policy.sink,
                                            policy.window)
        return self._device_sets

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept_rows / self.dense_rows if self.dense_rows else 0.0

