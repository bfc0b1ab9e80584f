"""Sampling distributions and the speculative acceptance rule, against closed-form answers."""

import numpy as np
import pytest
from scipy.stats import chisquare

from sts_edge import speculative
from sts_edge.sampling import GREEDY, SamplingParams, probabilities, sample
from sts_edge.speculative import accept_drafts, residual_distribution

from fixtures.numpy_backend import ArrayDistributions

SAMPLED = SamplingParams(temperature=1.0)


def as_distributions(probs: np.ndarray) -> ArrayDistributions:
    """Distributions whose probabilities are exactly `probs` (softmax of their logs)."""
    with np.errstate(divide="ignore"):
        return ArrayDistributions(np.log(probs), SAMPLED)


def test_greedy_is_one_hot_argmax():
    logits = np.array([[0.1, 3.0, -1.0], [5.0, 4.9, 0.0]])
    probs = probabilities(logits, SamplingParams())
    assert probs.tolist() == [[0, 1, 0], [1, 0, 0]]


def test_temperature_top_k_top_p_against_hand_computation():
    logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    full = probabilities(logits, SamplingParams(temperature=1.0))
    np.testing.assert_allclose(full, [[0.5, 0.2, 0.15, 0.1, 0.05]])
    hot = probabilities(logits, SamplingParams(temperature=2.0))
    expected = np.sqrt([0.5, 0.2, 0.15, 0.1, 0.05])
    np.testing.assert_allclose(hot[0], expected / expected.sum())
    top_k = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    np.testing.assert_allclose(top_k[0], [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    # top_p 0.6: 0.5 alone does not reach it, 0.5 + 0.2 does; the crossing token is kept.
    top_p = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.6))
    np.testing.assert_allclose(top_p[0], [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    top_p = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.45))
    np.testing.assert_allclose(top_p[0], [1, 0, 0, 0, 0])


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)])
def test_bad_sampling_values_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    probs = np.array([0.1, 0.0, 0.6, 0.3])
    draws = [sample(probs, SamplingParams(seed=7).rng()) for _ in range(3)]
    assert len(set(draws)) == 1
    rng = np.random.default_rng(0)
    counts = np.bincount([sample(probs, rng) for _ in range(20000)], minlength=4)
    assert counts[1] == 0
    assert chisquare(counts[[0, 2, 3]], 20000 * probs[[0, 2, 3]]).pvalue > 1e-3


def _first_token_counts(p, q, n, rng, accept=accept_drafts):
    """The first committed token of many speculative rounds with fixed (context-free) p and q."""
    counts = np.zeros(p.shape[1], dtype=int)
    q_dist, p_dist = as_distributions(q), as_distributions(p)
    for _ in range(n):
        drafts = [sample(row, rng) for row in q]
        accepted, next_token = accept(drafts, q_dist, p_dist, SAMPLED, rng)
        counts[drafts[0] if accepted else next_token] += 1
    return counts


def _random_distributions(rng, rows, vocab, sharpness):
    logits = rng.normal(size=(rows, vocab)) * sharpness
    return probabilities(logits, SamplingParams(temperature=1.0))


def test_rejection_sampling_reproduces_the_target_distribution():
    rng = np.random.default_rng(1)
    p = _random_distributions(rng, 4, 6, 1.5)
    q = _random_distributions(rng, 3, 6, 1.5)
    n = 30000
    counts = _first_token_counts(p, q, n, rng)
    assert chisquare(counts, n * p[0]).pvalue > 1e-3


def test_a_broken_residual_is_detected(monkeypatch):
    """Resampling from p instead of norm(max(0, p - q)) skews the output towards q: the test sees it."""
    rng = np.random.default_rng(1)
    p = _random_distributions(rng, 4, 6, 1.5)
    q = _random_distributions(rng, 3, 6, 1.5)
    monkeypatch.setattr(speculative, "residual_distribution", lambda p_row, q_row: p_row)
    n = 30000
    counts = _first_token_counts(p, q, n, rng)
    assert chisquare(counts, n * p[0]).pvalue < 1e-6


def test_residual_is_normalised_positive_part():
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.5, 0.3])
    np.testing.assert_allclose(residual_distribution(p, q), [1.0, 0.0, 0.0])


def test_greedy_acceptance_is_exact_match():
    p = ArrayDistributions(np.array([[0, 5.0, 0], [4.0, 0, 0], [0, 0, 1.0]]), GREEDY)
    q = ArrayDistributions(np.array([[0, 5.0, 0], [0, 3.0, 0]]), GREEDY)
    rng = np.random.default_rng(0)
    assert accept_drafts([1, 1], q, p, GREEDY, rng) == (1, 0)  # second draft disagrees: target's argmax 0
    q_all = ArrayDistributions(np.array([[0, 5.0, 0], [4.0, 0, 0]]), GREEDY)
    assert accept_drafts([1, 0], q_all, p, GREEDY, rng) == (2, 2)  # all accepted: bonus is argmax of row 3


def test_the_general_rule_at_one_hot_distributions_is_the_greedy_rule():
    """At temperature 0 the loop takes a shortcut (argmax only); the general rule on the same one-hot
    distributions gives the same answer for every draft sequence."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        logits_p, logits_q = rng.normal(size=(4, 5)), rng.normal(size=(3, 5))
        drafts = logits_q.argmax(axis=-1).tolist()  # what a greedy draft proposes
        one_hot_p = as_distributions(probabilities(logits_p, GREEDY))
        one_hot_q = as_distributions(probabilities(logits_q, GREEDY))
        general = accept_drafts(drafts, one_hot_q, one_hot_p, SAMPLED, rng)
        greedy = accept_drafts(drafts, ArrayDistributions(logits_q, GREEDY), ArrayDistributions(logits_p, GREEDY), GREEDY, rng)
        assert general == greedy
