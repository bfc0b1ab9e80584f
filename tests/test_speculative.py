"""The speculative loop: exact greedy equivalence, lossless sampling, and cache rollback."""


import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from sts_edge.backend import load_model
from sts_edge.sampling import SamplingParams, probabilities
from sts_edge.speculative import GenerationStats, generate_tokens

BACKENDS = ["torch-cpu", "mlx"]
# Where a round's drafts are chosen on a GPU (and its steps replay CUDA graphs).
WITH_GPU = BACKENDS + [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs an NVIDIA GPU")])]
GREEDY = SamplingParams()


def greedy_reference(hf, prompt: list[int], n: int) -> list[int]:
    """The target's own greedy continuation, from transformers without any cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def prompt():
    return np.random.default_rng(3).integers(0, 320, 12).tolist()


@pytest.fixture(scope="module")
def reference_tokens(model_dirs, hf_model, prompt):
    return greedy_reference(hf_model(model_dirs["llama3"]), prompt, 24)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_greedy_decoding_equals_transformers(backend, model_dirs, prompt, reference_tokens):
    target = load_model(model_dirs["llama3"], backend, max_seq_len=128)
    assert list(generate_tokens(target, prompt, GREEDY, 24)) == reference_tokens


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", range(1, 9))
@pytest.mark.parametrize("draft_kind", ["other-model", "target-itself"])
def test_speculative_greedy_equals_target_greedy(backend, gamma, draft_kind, model_dirs, draft_dir, prompt, reference_tokens):
    target = load_model(model_dirs["llama3"], backend, max_seq_len=128)
    draft_path = draft_dir if draft_kind == "other-model" else model_dirs["llama3"]
    draft = load_model(draft_path, backend, max_seq_len=128)
    stats = GenerationStats()
    tokens = list(generate_tokens(target, prompt, GREEDY, 24, draft=draft, gamma=gamma, stats=stats))
    assert tokens == reference_tokens
    assert sum(stats.accepted_histogram) == stats.rounds
    if draft_kind == "target-itself":
        # Every draft is accepted, so each round commits gamma + 1 tokens (the last may be cut).
        assert stats.acceptance_rate == 1.0
        assert stats.rounds == -(-(24 - 1) // (gamma + 1))
    else:
        assert stats.acceptance_rate < 0.5  # an unrelated random draft rarely agrees


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_token_ends_generation(backend, model_dirs, prompt, reference_tokens):
    target = load_model(model_dirs["llama3"], backend, max_seq_len=128)
    draft = load_model(model_dirs["llama3"], backend, max_seq_len=128)
    stop = reference_tokens[5]
    stats = GenerationStats()
    tokens = list(generate_tokens(target, prompt, GREEDY, 24, frozenset({stop}), draft=draft, gamma=4, stats=stats))
    assert tokens == reference_tokens[: reference_tokens.index(stop) + 1]
    assert stats.finish_reason == "stop"


# --- lossless rejection sampling on a tiny vocabulary ------------------------------------------

TINY_VOCAB = 8


@pytest.fixture(scope="module")
def tiny_vocab_pair(tmp_path_factory):
    """Target and draft with an 8-token vocabulary (no tokenizer needed: the loop runs on ids)."""
    from fixtures.models import build_random_model

    dirs = []
    for name, seed in (("target", 10), ("draft", 11)):
        path = tmp_path_factory.mktemp(f"tiny-vocab-{name}")
        model = build_random_model("llama3", TINY_VOCAB, seed=seed, num_hidden_layers=2)
        model.save_pretrained(path, safe_serialization=True)
        dirs.append(path)
    return dirs


def exact_two_token_distribution(target_dir, prompt, params):
    """P(t1, t2 | prompt) of the target's own sampling, from transformers logits."""
    from fixtures.models import load_hf_model

    hf = load_hf_model(target_dir)
    with torch.no_grad():
        first = probabilities(hf(torch.tensor([prompt])).logits[0, -1].numpy(), params)[0]
        seconds = [probabilities(hf(torch.tensor([prompt + [t]])).logits[0, -1].numpy(), params)[0] for t in range(TINY_VOCAB)]
    return (first[:, None] * np.array(seconds)).ravel()


def sampled_two_token_counts(target, draft, prompt, params, runs, accept=None):
    counts = np.zeros(TINY_VOCAB * TINY_VOCAB)
    options = {} if accept is None else {"accept": accept}
    rng = np.random.default_rng(0)
    for _ in range(runs):
        seeded = SamplingParams(temperature=params.temperature, top_p=params.top_p, seed=int(rng.integers(2**63)))
        t1, t2 = generate_tokens(target, prompt, seeded, 2, draft=draft, gamma=3, **options)
        counts[t1 * TINY_VOCAB + t2] += 1
    return counts


def chi_square_pvalue(counts, probs):
    """Pearson's test, with cells expected below 5 pooled so the chi-square law applies."""
    expected = probs * counts.sum()
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    return chisquare(observed[keep], expected[keep]).pvalue


def always_accept(draft_tokens, draft_probs, target_probs, params, rng):
    """A deliberately wrong rule: take every draft, as if p always equalled q."""
    from sts_edge.sampling import sample

    return len(draft_tokens), sample(target_probs.row(len(draft_tokens)), rng)


@pytest.mark.parametrize("backend", WITH_GPU)
def test_rejection_sampling_is_lossless(backend, tiny_vocab_pair):
    target_dir, draft_dir = tiny_vocab_pair
    params = SamplingParams(temperature=1.0)
    prompt = [1, 5, 2, 7]
    exact = exact_two_token_distribution(target_dir, prompt, params)
    exact_products = {"dtype": "float32"} if backend == "cuda" else {}  # a GPU would default to bfloat16
    target = load_model(target_dir, backend, max_seq_len=32, **exact_products)
    draft = load_model(draft_dir, backend, max_seq_len=32, **exact_products)
    runs = 3000
    counts = sampled_two_token_counts(target, draft, prompt, params, runs)
    # At this sample size a correct sampler fails with probability 1e-4; a rule that skews the
    # distribution by the draft/target gap (TV distance ~0.3 here) fails with near certainty.
    assert chi_square_pvalue(counts, exact) > 1e-4
    broken = sampled_two_token_counts(target, draft, prompt, params, runs, accept=always_accept)
    assert chi_square_pvalue(broken, exact) < 1e-8


@pytest.mark.parametrize("backend", WITH_GPU)
def test_sampled_drafts_chosen_on_the_device_are_the_hosts_draws(backend, draft_dir, prompt):
    """A round's sampled drafts are chosen where the logits are (the host waits once per round),
    from uniforms taken up front: each token is sts_edge.sampling.sample's draw (numpy) from the
    round's own distribution row with the same generator, and the generator ends where that leaves it."""
    from sts_edge.sampling import sample

    params = SamplingParams(temperature=0.8, top_p=0.9)
    model = load_model(draft_dir, backend, max_seq_len=64)
    model.prefill(prompt[:-1])
    rng, reference_rng = np.random.default_rng(5), np.random.default_rng(5)
    pending, tokens = prompt[-1:], []
    for _ in range(4):
        proposal = model.draft(pending, 5, params, rng, vocab=300)
        assert proposal.tokens == [sample(proposal.probs.row(i), reference_rng) for i in range(5)]
        tokens += proposal.tokens
        pending = proposal.tokens[-1:]  # a round's last draft token is not run
    assert len(set(tokens)) > 5  # sampled, not greedy
    assert rng.random() == reference_rng.random()


# --- rollback ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_leaves_exactly_the_accepted_prefix(backend, model_dirs, draft_dir, prompt):
    """After rounds with rejections, the next logits equal a fresh prefill of the committed text."""
    target = load_model(model_dirs["qwen3"], backend, max_seq_len=128)
    draft = load_model(draft_dir, backend, max_seq_len=128)
    stats = GenerationStats()
    tokens = list(generate_tokens(target, prompt, GREEDY, 10, draft=draft, gamma=6, stats=stats))
    assert stats.accepted_histogram[6] < stats.rounds  # some round rejected drafts
    committed = prompt + tokens
    assert target.length <= len(committed)
    # Continue from the caches as they are: run the rest of the committed text, then one more step.
    cached = target.prefill(committed[target.length :]).logits()
    fresh = load_model(model_dirs["qwen3"], backend, max_seq_len=128).prefill(committed).logits()
    np.testing.assert_allclose(cached, fresh, atol=1e-4)
    # The same for the draft, whose cache lags the target's.
    cached = draft.prefill(committed[draft.length :]).logits()
    fresh = load_model(draft_dir, backend, max_seq_len=128).prefill(committed).logits()
    np.testing.assert_allclose(cached, fresh, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_after_writing_past_it(backend, model_dirs):
    model = load_model(model_dirs["llama3"], backend, max_seq_len=64)
    ids = list(range(20))
    model.prefill(ids[:10])
    model.verify([300, 301, 302, 303])  # a rejected block
    model.rollback(10)
    after_rollback = model.verify(ids[10:]).logits()
    fresh = load_model(model_dirs["llama3"], backend, max_seq_len=64).verify(ids).logits()[10:]
    np.testing.assert_allclose(after_rollback, fresh, atol=1e-4)
    with pytest.raises(ValueError):
        model.rollback(21)
