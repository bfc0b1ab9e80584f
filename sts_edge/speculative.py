"""Token generation: plain autoregressive decoding and speculative decoding with a draft model.

Speculative round (Leviathan et al. 2023, Chen et al. 2023):
  1. the draft proposes gamma tokens x_1..x_gamma, sampling each from its distribution q_i;
  2. the target scores the last committed token and the gamma proposals in one pass, giving
     p_1..p_{gamma+1};
  3. x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection a
     token is drawn from norm(max(0, p_i - q_i)) and the round ends; if all are accepted a bonus
     token is drawn from p_{gamma+1}. At temperature 0 both distributions are one-hot, which
     makes this exactly greedy exact-match acceptance;
  4. both KV caches roll back to the accepted length.

With a mask policy (STS), step 1 also collects the draft's attention scores and step 2 reads, in
each sparse target layer, only the context tokens the policy picks from them (sts.md). With sparse
drafting, only the draft's first step of a round reads its whole cache and collects the scores;
its later steps read the draft's own sets, picked from those scores in the same way.

Cache invariant between rounds: the target's cache holds every committed token but the last;
the draft's cache holds a prefix of that (it lags by one more token after a fully accepted round),
and catches up by running the missing tokens at the start of its next round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from sts_edge.backend import CausalLM, Distributions, ScoreSpec
from sts_edge.errors import ContextLengthError
from sts_edge.mask import LayerHeadMap, MaskPolicy, VerificationPlan
from sts_edge.sampling import SamplingParams, sample

# Draft tokens per round: a verification block of gamma + 1 queries must fit the GPU kernels'
# query tile (triton_kernels.verify_attention.MAX_QUERIES), so every gamma takes the fast path.
MAX_GAMMA = 15


def check_gamma(gamma: int) -> None:
    if not 1 <= gamma <= MAX_GAMMA:
        raise ValueError(f"gamma (draft tokens per round) must be between 1 and {MAX_GAMMA}, got {gamma}")


@dataclass
class GenerationStats:
    """What one generation did, as counts and seconds; `summary` words them for the stats line."""

    gamma: int = 0  # draft tokens per round (0: the target decoded alone)
    policy: str = "dense"  # the verification policy asked for
    drafting: str = "dense"  # how draft steps after a round's first read the draft's cache (mask.DRAFTING)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV the target reused from the previous call
    draft_cached_tokens: int = 0  # the same for the draft (it may hold less than the target)
    prompt_seconds: float = 0.0  # prefill of both models and the first token: time to first token
    generated_tokens: int = 0
    decode_seconds: float = 0.0  # from the first generated token to the last
    rounds: int = 0  # target passes after the prompt
    accepted_histogram: list[int] = field(default_factory=list)  # rounds that accepted 0..gamma drafts
    draft_tokens: int = 0  # tokens the draft proposed
    draft_seconds: float = 0.0
    target_tokens: int = 0  # positions the target scored after the prompt
    target_seconds: float = 0.0
    kept_rows: int = 0  # context rows the target's verification passes read, summed over layers
    dense_rows: int = 0  # what dense verification would have read
    finish_reason: str = ""  # "stop" (end-of-sequence), "length" (max_tokens) or "context" (cache full)
    peak_memory_bytes: int = 0  # during this generation (set by the Engine)
    peak_memory_of: str = ""  # what that measures: "GPU", "Metal" or "process RSS"
    precision: str = ""  # the models' weights, activations and threads (set by the Engine)

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens the target accepted."""
        accepted = sum(n * count for n, count in enumerate(self.accepted_histogram))
        return accepted / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens committed per target pass after the first token (accepted drafts plus the target's own)."""
        return (self.generated_tokens - 1) / self.rounds if self.rounds else 0.0

    @property
    def sparsity(self) -> float:
        """Share of the context rows that verification skipped (0 for dense)."""
        return 1.0 - self.kept_rows / self.dense_rows if self.dense_rows else 0.0

    @property
    def decode_rate(self) -> float:
        """Tokens per second after the first (which comes from the prompt's pass), as llama.cpp's eval rate."""
        return self.rate(self.generated_tokens - 1, self.decode_seconds)

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens whose KV every model in use reused (the draft may hold fewer than the target,
        e.g. after a call without it)."""
        return min(self.cached_tokens, self.draft_cached_tokens) if self.gamma else self.cached_tokens

    @staticmethod
    def rate(tokens: int, seconds: float) -> float:
        return tokens / seconds if seconds > 0 and tokens > 0 else 0.0

    def summary(self) -> str:
        reused = f" ({self.reused_tokens} reused)" if self.reused_tokens else ""
        prefill = self.rate(self.prompt_tokens - self.reused_tokens, self.prompt_seconds)
        prompt = f"prompt {self.prompt_tokens} tok{reused}, prefill {prefill:.1f} tok/s"
        decode = f"generated {self.generated_tokens} tok"
        if self.generated_tokens > 1:
            decode += f", decode {self.decode_rate:.1f} tok/s"
        parts = [prompt, decode]
        if self.gamma and self.rounds:
            parts += [
                f"acceptance {self.acceptance_rate:.0%} ({self.mean_accepted:.2f} tok/round, gamma {self.gamma})",
                f"draft {self.rate(self.draft_tokens, self.draft_seconds):.1f} tok/s",
                f"verify {1000 * self.target_seconds / self.rounds:.1f} ms/round",
            ]
        if self.dense_rows and self.kept_rows < self.dense_rows:
            parts.append(f"sparse verification ({self.policy}): {self.sparsity:.0%} of context rows skipped")
        elif self.policy != "dense" and self.rounds:
            parts.append(f"verification dense ({self.policy}: the context fits the token budget)")
        if self.drafting == "sparse" and self.rounds:
            parts.append("sparse drafting")
        if self.peak_memory_of:
            parts.append(f"peak memory {self.peak_memory_bytes / 2**30:.2f} GiB ({self.peak_memory_of})")
        if self.precision:
            parts.append(self.precision)
        return " | ".join(parts)


def check_fits(model: CausalLM, prompt_len: int, lookahead: int) -> None:
    """A prompt must leave room in the cache for at least one generation round."""
    if prompt_len + lookahead > model.capacity:
        raise ContextLengthError(
            f"the prompt has {prompt_len} tokens but the KV cache holds {model.capacity} positions and a "
            f"generation step needs {lookahead} more; shorten the prompt or load with a larger max_seq_len"
        )


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def residual_distribution(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """norm(max(0, p - q)): what to sample from after the draft's token was rejected."""
    residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    # p == q exactly means rejection had probability zero; fall back to p to stay well defined.
    return residual / total if total > 0 else p


def pick(distributions: Distributions, index: int, params: SamplingParams, rng: np.random.Generator) -> int:
    """A token from one row: its argmax when greedy, else a draw (the row comes to the host)."""
    return distributions.argmax()[index] if params.greedy else sample(distributions.row(index), rng)


def accept_drafts(
    draft_tokens: Sequence[int],
    draft_probs: Distributions,
    target_probs: Distributions,
    params: SamplingParams,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """The lossless acceptance rule. Returns (accepted draft count, the target's next token).

    draft_probs: the gamma distributions the drafts were drawn from; target_probs: the target's
    gamma + 1 distributions at the same positions plus one. At temperature 0 both are one-hot, so
    the rule is exact match against the target's argmax, and only the argmax crosses to the host.
    """
    if params.greedy:
        best = target_probs.argmax()
        for i, token in enumerate(draft_tokens):
            if best[i] != token:
                return i, best[i]
        return len(draft_tokens), best[len(draft_tokens)]
    p, q = target_probs.probs_of(draft_tokens), draft_probs.probs_of(draft_tokens)
    for i in range(len(draft_tokens)):
        if q[i] <= 0 or rng.random() * q[i] >= p[i]:  # reject with probability 1 - min(1, p/q)
            target_row, draft_row = target_probs.row(i), draft_probs.row(i)
            # The draft's distribution covers the vocabulary both models share; the rest is 0 in q.
            draft_row = np.pad(draft_row, (0, len(target_row) - len(draft_row)))
            return i, sample(residual_distribution(target_row, draft_row), rng)
    return len(draft_tokens), sample(target_probs.row(len(draft_tokens)), rng)


def _common_vocab(target: CausalLM, draft: CausalLM) -> int:
    return min(target.config.vocab_size, draft.config.vocab_size)


def generate_tokens(
    target: CausalLM,
    prompt: Sequence[int],
    params: SamplingParams,
    max_tokens: int,
    stop_ids: frozenset[int] = frozenset(),
    draft: CausalLM | None = None,
    gamma: int = 4,
    stats: GenerationStats | None = None,
    policy: MaskPolicy | None = None,
    mapping: LayerHeadMap | None = None,
    cache_tokens: list[int] | None = None,
    accept: Callable[..., tuple[int, int]] = accept_drafts,
) -> Iterator[int]:
    """Yield generated token ids, with speculative decoding when a draft is given.

    `policy` makes verification sparse (None or "dense": every layer reads the whole context);
    `mapping` says which draft layer and head stand for each target layer and head (sts only;
    proportional when None). `stats` (if given) is filled in as tokens flow; `accept` exists so
    tests can prove a wrong rule is caught.

    `cache_tokens` enables prefix reuse across calls (multi-turn chat): it lists the tokens behind
    both caches (each cache holds a prefix of them); the part of the prompt it shares is not
    prefilled again, and it is updated to the new sequence when generation ends. Without it the
    caches start empty.
    """
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if draft is not None:
        check_gamma(gamma)
    gamma = gamma if draft is not None else 0
    if policy is not None and policy.name == "dense":
        policy = None
    if policy is not None:
        policy.check_model(target.config, target.capacity)
        if policy.name == "sts" and draft is None:
            raise ValueError("the sts policy takes its token sets from the draft's attention; give a draft model")
        if policy.name == "sts" and mapping is None:
            mapping = LayerHeadMap.proportional(target.config, draft.config, policy.granularity)
    plan = VerificationPlan(policy, mapping if policy is not None and policy.name == "sts" else None) \
        if policy is not None else None
    draft_plan = plan.for_draft(draft.config) if plan is not None and draft is not None else None
    lookahead = gamma + 1
    models = (target, draft) if draft is not None else (target,)
    for model in models:
        check_fits(model, len(prompt), lookahead)
    # Keep the cached prefix the prompt shares, but prefill at least one token for its distribution.
    keep = min(common_prefix(cache_tokens, prompt), len(prompt) - 1) if cache_tokens else 0
    for model in models:
        model.rollback(min(model.length, keep))
    stats = stats if stats is not None else GenerationStats()
    stats.gamma, stats.prompt_tokens, stats.cached_tokens = gamma, len(prompt), target.length
    stats.draft_cached_tokens = draft.length if draft is not None else 0
    stats.policy = "dense" if policy is None else policy.name
    if policy is not None and policy.name == "sts" and policy.candidates > 1:
        stats.policy = f"sts, two-stage x{policy.candidates}"
    stats.drafting = "sparse" if draft_plan is not None else "dense"
    stats.accepted_histogram = [0] * (gamma + 1)
    rng = params.rng()
    capacity = min(target.capacity, draft.capacity) if draft is not None else target.capacity

    start = time.perf_counter()
    sequence = list(prompt)
    if cache_tokens is not None:
        cache_tokens[:] = sequence[:keep]  # what the caches are known to hold if we stop early
    first = target.prefill(prompt[target.length :], params)
    if draft is not None:
        draft.prefill(prompt[draft.length :])
    sequence.append(pick(first, 0, params, rng))
    stats.prompt_seconds = time.perf_counter() - start
    if cache_tokens is not None:
        cache_tokens[:] = sequence
        sequence = cache_tokens  # one list: the caches' record follows every committed token
    decode_start = time.perf_counter()

    def emit(token: int) -> bool:
        """Record one committed token; True when generation must stop."""
        stats.generated_tokens += 1
        stats.decode_seconds = time.perf_counter() - decode_start
        if token in stop_ids:
            stats.finish_reason = "stop"
        elif stats.generated_tokens >= max_tokens:
            stats.finish_reason = "length"
        return bool(stats.finish_reason)

    yield sequence[-1]
    if emit(sequence[-1]):
        return

    while True:
        if len(sequence) + lookahead > capacity:
            stats.finish_reason = "context"
            return
        if draft is None:
            t0 = time.perf_counter()
            new_tokens = [pick(_verify(target, sequence[target.length :], params, plan, None, stats), 0, params, rng)]
            stats.target_seconds += time.perf_counter() - t0
            stats.target_tokens += 1
        else:
            new_tokens = _speculative_round(target, draft, sequence, params, gamma, rng, stats, accept, plan, draft_plan)
        stats.rounds += 1
        for token in new_tokens:
            sequence.append(token)
            yield token
            if emit(token):
                return


def _speculative_round(
    target: CausalLM,
    draft: CausalLM,
    sequence: list[int],
    params: SamplingParams,
    gamma: int,
    rng: np.random.Generator,
    stats: GenerationStats,
    accept: Callable[..., tuple[int, int]],
    plan: VerificationPlan | None,
    draft_plan: VerificationPlan | None = None,
) -> list[int]:
    """One draft-then-verify round; returns the tokens it commits (1 to gamma + 1). `draft_plan`:
    sparse drafting's plan for the draft's own steps after the first."""
    committed = len(sequence)

    t0 = time.perf_counter()
    collect = plan is not None and plan.needs_draft_scores(target.length)
    spec = ScoreSpec(plan.policy.granularity, plan.policy.aggregation) if collect else None
    # The draft's 1-2 catch-up tokens, then its own proposals, drawn over the vocabulary both share.
    proposal = draft.draft(sequence[draft.length :], gamma, params, rng, vocab=_common_vocab(target, draft), scores=spec,
                           sparse_steps=draft_plan if collect else None)
    t1 = time.perf_counter()
    target_probs = _verify(target, sequence[target.length :] + proposal.tokens, params, plan, proposal.scores, stats)
    accepted, next_token = accept(proposal.tokens, proposal.probs, target_probs, params, rng)
    t2 = time.perf_counter()

    # The target's cache now ends with the last accepted draft; the draft's cache holds at most
    # gamma - 1 of its proposals, so rolling it to the same length is always a truncation.
    target.rollback(committed + accepted)
    draft.rollback(min(draft.length, committed + accepted))

    stats.draft_tokens += gamma
    stats.draft_seconds += t1 - t0
    stats.target_tokens += gamma + 1
    stats.target_seconds += t2 - t1
    stats.accepted_histogram[accepted] += 1
    return proposal.tokens[:accepted] + [next_token]


def _verify(target: CausalLM, block: list[int], params: SamplingParams, plan: VerificationPlan | None,
            draft_scores, stats: GenerationStats) -> Distributions:
    """The target's distributions at every position of `block`, reading what the plan selects."""
    if plan is not None:
        kept, dense = plan.policy.rows_read(target.length, target.config.num_hidden_layers)
        stats.kept_rows += kept
        stats.dense_rows += dense
    return target.verify(block, params, plan, draft_scores)
