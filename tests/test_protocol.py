"""The core's loop against a backend written from the protocol alone (tests/fixtures/numpy_backend.py).

The oracles hold whatever a backend's numerics: speculative greedy output is the target's own
greedy output; with a budget covering the context STS equals dense; rejection sampling reproduces
the target's distribution; and the loop calls nothing outside the protocol.
"""

import numpy as np
import pytest
from scipy.stats import chisquare

from sts_edge.mask import LayerHeadMap, MaskPolicy
from sts_edge.sampling import GREEDY, SamplingParams, probabilities, sample
from sts_edge.speculative import GenerationStats, generate_tokens

from fixtures.numpy_backend import NumpyModel

PROMPT = [3, 17, 5, 9, 30, 2, 11, 8, 21, 4, 13, 6, 40, 7, 1, 19, 25, 12, 33, 10]


def target_greedy(n: int) -> list[int]:
    """The target stepping one token at a time, outside the loop."""
    model, tokens = NumpyModel(48, 96, seed=0), []
    distribution = model.prefill(PROMPT)
    for _ in range(n):
        tokens.append(distribution.argmax()[0])
        distribution = model.prefill(tokens[-1:])
    return tokens


@pytest.mark.parametrize("gamma", [1, 2, 4, 6])
@pytest.mark.parametrize("draft_seed", [0, 1])
def test_speculative_greedy_equals_the_targets_greedy(gamma, draft_seed):
    target, draft = NumpyModel(48, 96, seed=0), NumpyModel(48, 96, seed=draft_seed)
    stats = GenerationStats()
    tokens = list(generate_tokens(target, PROMPT, GREEDY, 30, draft=draft, gamma=gamma, stats=stats))
    assert tokens == target_greedy(30)
    if draft_seed == 0:  # the target as its own draft: every proposal is accepted
        assert stats.acceptance_rate == 1.0
    else:
        assert stats.acceptance_rate < 1.0


def test_full_budget_sts_equals_dense_and_a_small_budget_does_not():
    target, draft = NumpyModel(48, 96, seed=0), NumpyModel(48, 96, seed=1)
    mapping = LayerHeadMap(np.array([0]), np.array([[0]]))
    dense = list(generate_tokens(target, PROMPT, GREEDY, 30, draft=draft, gamma=3))
    covering = MaskPolicy("sts", budget=96, sink=2, window=4)
    assert list(generate_tokens(target, PROMPT, GREEDY, 30, draft=draft, gamma=3, policy=covering, mapping=mapping)) == dense
    stats = GenerationStats()
    small = MaskPolicy("sts", budget=2, sink=1, window=2)
    sparse = list(generate_tokens(target, PROMPT, GREEDY, 30, draft=draft, gamma=3, policy=small, mapping=mapping,
                                  stats=stats))
    assert stats.sparsity > 0.5 and sparse != dense  # the sparse path is live


def two_token_distribution(prompt: list[int], params: SamplingParams) -> np.ndarray:
    model = NumpyModel(8, 32, seed=10, sharpness=1.0)
    first = probabilities(model.prefill(prompt).logits(), params)[0]
    seconds = []
    for token in range(8):
        model.rollback(len(prompt) - 1)  # the prompt's last token is re-run with the candidate after it
        seconds.append(probabilities(model.verify([prompt[-1], token]).logits()[-1:], params)[0])
    return (first[:, None] * np.array(seconds)).ravel()


def always_accept(draft_tokens, draft_probs, target_probs, params, rng):
    """A deliberately wrong rule: take every draft, as if p always equalled q."""
    return len(draft_tokens), sample(target_probs.row(len(draft_tokens)), rng)


@pytest.mark.parametrize("rule, drafting", [("lossless", "dense"), ("broken", "dense"), ("lossless", "sparse")])
def test_rejection_sampling_reproduces_the_target_distribution(rule, drafting):
    params = SamplingParams(temperature=1.0)
    prompt = [1, 5, 2, 7]
    exact = two_token_distribution(prompt, params)
    target, draft = NumpyModel(8, 32, seed=10, sharpness=1.0), NumpyModel(8, 32, seed=11, sharpness=1.0)
    options = {"accept": always_accept} if rule == "broken" else {}
    if drafting == "sparse":  # the draft's later steps read 3 of its 4+ rows; the target reads all of them
        options["policy"] = MaskPolicy("sts", budget=1, sink=1, window=1, dense_layers=(0,), drafting="sparse")
        options["mapping"] = LayerHeadMap(np.array([0]), np.array([[0]]))
    counts, rng = np.zeros(64), np.random.default_rng(0)
    for _ in range(4000):
        seeded = SamplingParams(temperature=1.0, seed=int(rng.integers(2**63)))
        t1, t2 = generate_tokens(target, prompt, seeded, 2, draft=draft, gamma=3, **options)
        counts[t1 * 8 + t2] += 1
    expected = exact * counts.sum()
    pooled = expected < 5
    pvalue = chisquare(np.append(counts[~pooled], counts[pooled].sum()), np.append(expected[~pooled], expected[pooled].sum())).pvalue
    if rule == "lossless":
        assert pvalue > 1e-4
    else:
        assert pvalue < 1e-8


def test_rollback_leaves_exactly_the_accepted_prefix():
    target, draft = NumpyModel(48, 96, seed=0), NumpyModel(48, 96, seed=1)
    tokens = list(generate_tokens(target, PROMPT, GREEDY, 12, draft=draft, gamma=5))
    committed = PROMPT + tokens
    target.rollback(min(target.length, len(committed) - 1))  # the last round may hold tokens past max_tokens
    fresh = NumpyModel(48, 96, seed=0).prefill(committed).logits()
    np.testing.assert_allclose(target.prefill(committed[target.length :]).logits(), fresh, atol=1e-9)
