"""The mask policy: which context tokens each target layer and head reads while verifying.

A policy is data (MaskPolicy, and for sts a LayerHeadMap from draft to target layers and heads,
bundled as a VerificationPlan) that the core hands to a backend; the backend selects the sets on
its own device. Everything here is numpy: the policy's settings and checks, and the reference of
the selection contract that every backend's selection is tested against.

The contract. For a verification block after `context` committed tokens, target layer `layer`
runs dense when `policy.is_dense_at(context)` or the layer is one of `dense_layers`; otherwise each
unit (a KV head, or a query head at "query" granularity) reads a sorted, unique set of
`policy.kept_tokens(context)` positions: the first `sink`, the last `window`, and the
`budget_tokens(context)` best-scoring positions in between, plus the block itself, causally. The
score is, by policy: sts, the draft's attention (its running [layers, units, capacity] buffer,
through the map), or with `candidates` > 1 the target's own attention mass over the draft's top
`candidates` x budget positions (two-stage selection: the draft nominates, the block's queries
choose, reading the candidates' keys but only the kept rows' values); streaming, recency;
oracle, the block's own dense attention mass; quest, a per-16-token-page upper bound of q.k from
the page's key minima and maxima. `reference_sets` is the contract written out. With sparse
drafting (`drafting`), a round's draft steps after its first read sets by the same contract, each
draft layer and unit its own (`VerificationPlan.for_draft`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from sts_edge.config import ModelConfig

POLICIES = ("dense", "sts", "oracle", "streaming", "quest")
AGGREGATIONS = ("max", "sum")
GRANULARITIES = ("kv", "query")  # one set per target KV head, or per target query head
# How a round's draft steps read the draft's own cache (sts): every step densely, or only the
# first (which writes the round's scores), the others the draft's own sets selected from them.
DRAFTING = ("dense", "sparse")


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
    drafting: str = "dense"  # "sparse": the cheaper drafting pass (DRAFTING above); other policies ignore it
    # sts: the draft nominates candidates x budget positions and the block's own attention over them
    # keeps the budget's best (1: the draft's top budget, as nominated). Other policies ignore it.
    # 5: the fewest nominations whose sets stay close to the oracle's at long context, for a small
    # part of what sparse verification saves; more buy a little recall for a cost that grows
    # (benchmarks/README.md, "Why the default is 5").
    candidates: int = 5

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
        if self.drafting not in DRAFTING:
            raise MaskPolicyError(f"drafting must be one of {DRAFTING}, got {self.drafting!r}")
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, (int, np.integer)) or self.candidates < 1:
            raise MaskPolicyError(f"candidates must be a whole number >= 1 (times the budget), got {self.candidates!r}")

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

    def nominations(self, context: int) -> int:
        """Two-stage selection's nominations per budget token after `context` tokens: `candidates`,
        or fewer where the nominees would not leave some of the context out (the most that do, at
        least 1): a second stage over every key would cost what dense attention does, and no
        fixed-shape CUDA graph holds it."""
        room = (context - self.sink - self.window - 1) // self.budget_tokens(context)
        return max(1, min(self.candidates, room))

    def nominated_tokens(self, context: int) -> int:
        """Entries of the draft's candidate sets under two-stage selection (sink and window included)."""
        return min(self.nominations(context) * self.budget_tokens(context) + self.sink + self.window, context)

    def is_dense_at(self, context: int) -> bool:
        return self.name == "dense" or self.kept_tokens(context) >= context

    def rows_read(self, context: int, layers: int) -> tuple[int, int]:
        """(context rows a verification pass reads over all layers, what dense attention reads)."""
        if self.is_dense_at(context):
            return layers * context, layers * context
        dense = sum(1 for layer in range(layers) if layer in self.dense_layers)
        return dense * context + (layers - dense) * self.kept_tokens(context), layers * context


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
    """Dense attention mass of the verification block over the context, summed per unit.

    q: [heads, n, head_dim] (the block's queries, rotated); keys: [kv_heads, >= context + n, head_dim].
    Returns [units, context]: the attention mass each context position receives, summed over
    the block's queries (and over the query heads of a group at "kv" granularity). The block
    attends to itself causally, which enters the softmax normaliser.
    """
    mass = attention_probabilities(q, keys, context)[..., :context].sum(axis=1)  # [heads, context]
    kv_heads = keys.shape[0]
    return mass.reshape(kv_heads, -1, context).sum(axis=1) if granularity == "kv" else mass


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


def candidate_attention(q: np.ndarray, keys: np.ndarray, context: int, candidates: np.ndarray,
                        granularity: str) -> np.ndarray:
    """Two-stage selection's second stage: the block's causal softmax over the candidate rows and
    the block itself (what attention reading only those rows computes), its mass on each candidate
    summed per unit as in group_attention; [units, context], -inf off the candidates.

    q: [heads, n, head_dim]; keys: [kv_heads, >= context + n, head_dim]; candidates: [units, m] positions.
    """
    heads, n, head_dim = q.shape
    kv_heads = keys.shape[0]
    count, m = candidates.shape
    queries = q.reshape(kv_heads, -1, head_dim) if granularity == "kv" else q  # [units, queries, d], head-major
    kv_of_unit = np.arange(count) * kv_heads // count
    rows = np.concatenate([candidates, np.broadcast_to(np.arange(context, context + n), (count, n))], axis=1)
    logits = np.einsum("uqd,umd->uqm", queries.astype(np.float64), keys[kv_of_unit[:, None], rows].astype(np.float64))
    positions = context + np.tile(np.arange(n), queries.shape[1] // n)
    logits = np.where(rows[:, None, :] <= positions[None, :, None], logits / np.sqrt(head_dim), -np.inf)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    mass = (probs / probs.sum(axis=-1, keepdims=True))[..., :m].sum(axis=1)
    out = np.full((count, context), -np.inf)
    np.put_along_axis(out, candidates, mass, axis=-1)
    return out


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


def units(config: ModelConfig, granularity: str) -> int:
    return config.num_key_value_heads if granularity == "kv" else config.num_attention_heads


@dataclass(frozen=True)
class VerificationPlan:
    """A mask policy bound to a model pair, handed to the target's backend for a whole generation:
    the policy, and for sts the map from draft to target layers and heads."""

    policy: MaskPolicy
    mapping: LayerHeadMap | None = None

    def __post_init__(self) -> None:
        if self.policy.name == "sts" and self.mapping is None:
            raise ValueError("the sts policy needs a LayerHeadMap from draft to target layers and heads")

    def needs_draft_scores(self, context: int) -> bool:
        """Whether a round verifying after `context` tokens selects from the draft's scores."""
        return self.policy.name == "sts" and not self.policy.is_dense_at(context)

    def layer_is_dense(self, layer: int, context: int) -> bool:
        return self.policy.is_dense_at(context) or layer in self.policy.dense_layers

    def at(self, context: int) -> "VerificationPlan":
        """This plan as it runs after `context` tokens: two-stage selection nominates fewer where
        its nominees would cover the context (MaskPolicy.nominations)."""
        nominations = self.policy.nominations(context)
        if nominations == self.policy.candidates:
            return self
        return replace(self, policy=replace(self.policy, candidates=nominations))

    def for_draft(self, draft: ModelConfig) -> "VerificationPlan | None":
        """With sparse drafting, the plan of the draft's own steps after a round's first: the same
        sets by the same scores, each draft layer and unit reading its own; else None."""
        if self.policy.name != "sts" or self.policy.drafting != "sparse":
            return None
        policy = replace(self.policy, dense_layers=(), candidates=1)  # those name target layers; its own sets
        return VerificationPlan(policy, LayerHeadMap.proportional(draft, draft, policy.granularity))


def attention_probabilities(q: np.ndarray, keys: np.ndarray, context: int) -> np.ndarray:
    """Causal softmax of the block's queries over the context and the block: [heads, n, context + n].

    q: [heads, n, head_dim] at positions context..context+n (rotated); keys: [kv_heads, >= context + n,
    head_dim]. Float64, for references and measurements."""
    heads, n, head_dim = q.shape
    kv_heads = keys.shape[0]
    qg = q.reshape(kv_heads, heads // kv_heads, n, head_dim).astype(np.float64)
    logits = np.einsum("kgnd,kld->kgnl", qg, keys[:, : context + n].astype(np.float64)) / np.sqrt(head_dim)
    causal = np.arange(context + n)[None, :] <= (context + np.arange(n))[:, None]
    logits = np.where(causal, logits, -np.inf)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (probs / probs.sum(axis=-1, keepdims=True)).reshape(heads, n, context + n)


def draft_scores(q: np.ndarray, keys: np.ndarray, context: int, granularity: str, aggregation: str) -> np.ndarray:
    """What one draft forward folds into its running scores: [units, context + n], the max (or sum)
    of its queries' attention probabilities, over each group's query heads at "kv" granularity."""
    probs = attention_probabilities(q, keys, context)
    heads, n, length = probs.shape
    kv_heads = keys.shape[0]
    pooled = probs.reshape(kv_heads, heads // kv_heads * n, length) if granularity == "kv" else probs
    return pooled.max(axis=1) if aggregation == "max" else pooled.sum(axis=1)


def reference_sets(plan: VerificationPlan, layer: int, context: int, units: int, q: np.ndarray | None = None,
                   keys: np.ndarray | None = None, scores: np.ndarray | None = None) -> np.ndarray | None:
    """The contract: sorted index sets [units, kept] of target `layer` for a block after `context`
    tokens, or None where the layer runs dense. sts needs the draft's `scores` [draft_layers,
    draft_units, >= context] (and with candidates > 1 the queries and keys too); oracle and quest
    the block's queries and keys (as in attention_probabilities)."""
    policy = plan.policy
    if plan.layer_is_dense(layer, context):
        return None
    if policy.name == "sts":
        per_unit = scores[plan.mapping.layer_map[layer]][plan.mapping.head_map[layer], :context]
        if policy.nominations(context) > 1:
            nominated = select_indices(per_unit, policy.nominated_tokens(context), policy.sink, policy.window)
            per_unit = candidate_attention(q, keys, context, nominated, policy.granularity)
    elif policy.name == "streaming":  # recency as the score: the budget extends the local window
        per_unit = np.broadcast_to(np.arange(context, dtype=np.float64), (units, context))
    elif policy.name == "oracle":
        per_unit = group_attention(q, keys, context, policy.granularity)
    else:  # quest
        per_unit = quest_scores(q, keys, context, policy.granularity, policy.page_size)
    return select_indices(per_unit, policy.kept_tokens(context), policy.sink, policy.window)
