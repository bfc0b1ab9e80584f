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

Cache invariant between rounds: the target's cache holds every committed token but the last;
the draft's cache holds a prefix of that (it lags by one more token after a fully accepted round),
and catches up by running the missing tokens at the start of its next round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from sts_edge.backend import CausalLM
from sts_edge.errors import ContextLengthError
from sts_edge.sampling import SamplingParams, probabilities, sample

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds activation memory on long prompts


@dataclass
class GenerationStats:
    gamma: int = 0
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    rounds: int = 0
    accepted_histogram: list[int] = field(default_factory=list)  # rounds that accepted 0..gamma drafts
    draft_tokens: int = 0
    draft_seconds: float = 0.0
    target_tokens: int = 0  # positions the target scored after the prompt
    target_seconds: float = 0.0
    finish_reason: str = ""  # "stop" (end-of-sequence), "length" (max_tokens) or "context" (cache full)

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens the target accepted."""
        accepted = sum(n * count for n, count in enumerate(self.accepted_histogram))
        return accepted / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens committed per target pass (accepted drafts plus the target's own token)."""
        return self.generated_tokens / self.rounds if self.rounds else 0.0

    def rate(self, tokens: int, seconds: float) -> float:
        return tokens / seconds if seconds > 0 else 0.0

    def summary(self) -> str:
        parts = [
            f"prompt {self.prompt_tokens} tok {self.rate(self.prompt_tokens, self.prompt_seconds):.1f} tok/s",
            f"generated {self.generated_tokens} tok {self.rate(self.generated_tokens, self.decode_seconds):.1f} tok/s",
        ]
        if self.gamma:
            parts += [
                f"acceptance {self.acceptance_rate:.0%} ({self.mean_accepted:.2f} tok/round, gamma {self.gamma})",
                f"draft {self.rate(self.draft_tokens, self.draft_seconds):.1f} tok/s",
                f"target {self.rate(self.target_tokens, self.target_seconds):.1f} tok/s",
            ]
        return " | ".join(parts)


def check_fits(model: CausalLM, prompt_len: int, lookahead: int) -> None:
    """A prompt must leave room in the cache for at least one generation round."""
    if prompt_len + lookahead > model.capacity:
        raise ContextLengthError(
            f"the prompt has {prompt_len} tokens but the KV cache holds {model.capacity} positions and a "
            f"generation step needs {lookahead} more; shorten the prompt or load with a larger max_seq_len"
        )


def prefill(model: CausalLM, tokens: Sequence[int]) -> np.ndarray:
    """Run a prompt through a model in chunks; return the last position's logits [1, vocab]."""
    logits = None
    for start in range(0, len(tokens), PREFILL_CHUNK):
        logits = model.forward(tokens[start : start + PREFILL_CHUNK])
    assert logits is not None, "prefill of an empty prompt"
    return logits


def residual_distribution(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """norm(max(0, p - q)): what to sample from after the draft's token was rejected."""
    residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    # p == q exactly means rejection had probability zero; fall back to p to stay well defined.
    return residual / total if total > 0 else p


def accept_drafts(
    draft_tokens: Sequence[int],
    draft_probs: np.ndarray,
    target_probs: np.ndarray,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """The lossless acceptance rule. Returns (accepted draft count, the target's next token).

    draft_probs: [gamma, vocab] distributions the drafts were sampled from;
    target_probs: [gamma + 1, vocab] target distributions at the same positions plus one.
    """
    for i, token in enumerate(draft_tokens):
        p, q = target_probs[i, token], draft_probs[i, token]
        if q <= 0 or rng.random() * q >= p:  # reject with probability 1 - min(1, p/q)
            return i, sample(residual_distribution(target_probs[i], draft_probs[i]), rng)
    return len(draft_tokens), sample(target_probs[-1], rng)


def _common_vocab(target: CausalLM, draft: CausalLM) -> int:
    return min(target.config.vocab_size, draft.config.vocab_size)


def _draft_probs(logits: np.ndarray, vocab: int, target_vocab: int, params: SamplingParams) -> np.ndarray:
    """Draft distributions over the target's vocabulary (rows padded for ids the draft lacks)."""
    probs = probabilities(logits[:, :vocab], params)
    if vocab < target_vocab:
        probs = np.pad(probs, ((0, 0), (0, target_vocab - vocab)))
    return probs


def generate_tokens(
    target: CausalLM,
    prompt: Sequence[int],
    params: SamplingParams,
    max_tokens: int,
    stop_ids: frozenset[int] = frozenset(),
    draft: CausalLM | None = None,
    gamma: int = 4,
    stats: GenerationStats | None = None,
    accept: Callable[..., tuple[int, int]] = accept_drafts,
) -> Iterator[int]:
    """Yield generated token ids, with speculative decoding when a draft is given.

    Both models' caches are reset to empty first. `stats` (if given) is filled in as tokens flow;
    `accept` exists so tests can prove that a wrong acceptance rule is caught.
    """
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if draft is not None and not 1 <= gamma <= 32:
        raise ValueError(f"gamma (draft tokens per round) must be between 1 and 32, got {gamma}")
    gamma = gamma if draft is not None else 0
    lookahead = gamma + 1
    for model in (target, draft) if draft is not None else (target,):
        check_fits(model, len(prompt), lookahead)
        model.rollback(0)
    stats = stats if stats is not None else GenerationStats()
    stats.gamma, stats.prompt_tokens = gamma, len(prompt)
    stats.accepted_histogram = [0] * (gamma + 1)
    rng = params.rng()
    capacity = min(target.capacity, draft.capacity) if draft is not None else target.capacity

    start = time.perf_counter()
    logits = prefill(target, prompt)
    if draft is not None:
        prefill(draft, prompt)
    stats.prompt_seconds = time.perf_counter() - start
    sequence = list(prompt)
    sequence.append(sample(probabilities(logits, params)[0], rng))
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
            logits = target.forward(sequence[target.length :])
            stats.target_seconds += time.perf_counter() - t0
            stats.target_tokens += 1
            new_tokens = [sample(probabilities(logits, params)[0], rng)]
        else:
            new_tokens = _speculative_round(target, draft, sequence, params, gamma, rng, stats, accept)
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
) -> list[int]:
    """One draft-then-verify round; returns the tokens it commits (1 to gamma + 1)."""
    vocab, target_vocab = _common_vocab(target, draft), target.config.vocab_size
    committed = len(sequence)

    t0 = time.perf_counter()
    drafts: list[int] = []
    draft_probs = np.empty((gamma, target_vocab))
    pending = sequence[draft.length :]  # the draft's 1-2 catch-up tokens, then its own proposals
    for i in range(gamma):
        draft_probs[i] = _draft_probs(draft.forward(pending), vocab, target_vocab, params)[0]
        drafts.append(sample(draft_probs[i], rng))
        pending = drafts[-1:]
    t1 = time.perf_counter()
    target_logits = target.forward(sequence[target.length :] + drafts, all_logits=True)
    target_probs = probabilities(target_logits, params)
    accepted, next_token = accept(drafts, draft_probs, target_probs, rng)
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
    return drafts[:accepted] + [next_token]
