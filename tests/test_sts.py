"""STS: draft scores, index sets, sparse verification, recall, policies and their errors."""

import dataclasses

import numpy as np
import pytest

from sts_edge import load
from sts_edge.backend import ScoreSpec, load_model
from sts_edge.mask import (
    LayerHeadMap,
    MaskPolicy,
    MaskPolicyError,
    VerificationPlan,
    attention_recall,
    candidate_attention,
    group_attention,
    quest_scores,
    reference_sets,
    select_indices,
)
from sts_edge.sampling import GREEDY, SamplingParams
from sts_edge.speculative import GenerationStats, generate_tokens

BACKENDS = ["torch-cpu", "mlx"]
POLICY_NAMES = ["sts", "oracle", "streaming", "quest"]


# --- numpy references, written independently of the code under test ---------------------------


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def masked_attention_reference(q, cache_k, cache_v, start, indices):
    """Full attention over every cache row with -inf outside (set + causal block), per query head."""
    heads, n, d = q.shape
    kv_heads = cache_k.shape[0]
    units = indices.shape[0]
    out = np.zeros_like(q, dtype=np.float64)
    for h in range(heads):
        kv = h // (heads // kv_heads)
        unit = h if units == heads else kv
        allowed = np.zeros((n, start + n), dtype=bool)
        allowed[:, indices[unit]] = True
        allowed[:, start:] = np.tril(np.ones((n, n), dtype=bool))
        logits = q[h] @ cache_k[kv, : start + n].T / np.sqrt(d)
        probs = softmax(np.where(allowed, logits, -np.inf))
        out[h] = probs @ cache_v[kv, : start + n]
    return out


def draft_scores_reference(q, keys, start, granularity, aggregation):
    """Per-unit scores of one call: max/sum over queries (and group heads) of causal softmax probs."""
    heads, n, d = q.shape
    kv_heads, length = keys.shape[0], keys.shape[1]
    causal = np.arange(length)[None, :] <= (start + np.arange(n))[:, None]
    probs = np.stack([softmax(np.where(causal, q[h] @ keys[h // (heads // kv_heads)].T / np.sqrt(d), -np.inf)) for h in range(heads)])
    if granularity == "kv":
        probs = probs.reshape(kv_heads, heads // kv_heads * n, length)
    reduce = np.max if aggregation == "max" else np.sum
    return reduce(probs, axis=1)


def random_sets(rng, units, context, kept):
    return np.sort(np.stack([rng.choice(context, kept, replace=False) for _ in range(units)]), axis=-1)


# --- backend attention paths against the references ------------------------------------------


def run_sparse_attend(backend, q, cache_k, cache_v, start, indices):
    if backend == "torch-cpu":
        import torch

        from sts_edge.backends.torch.attention import sparse_attend

        t = lambda a: torch.from_numpy(a)  # noqa: E731
        return sparse_attend(t(q), t(cache_k), t(cache_v), start, t(indices)).numpy()
    import mlx.core as mx

    from sts_edge.backends.mlx.attention import sparse_attend

    m = lambda a: mx.array(a)  # noqa: E731
    out = sparse_attend(m(q)[None], m(cache_k)[None], m(cache_v)[None], start, m(indices), q.shape[-1] ** -0.5)
    return np.array(out[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("gamma", range(1, 9))
@pytest.mark.parametrize("granularity", ["kv", "query"])
def test_sparse_verification_equals_masked_dense_attention(backend, group, gamma, granularity):
    rng = np.random.default_rng(gamma * 10 + group)
    kv_heads, head_dim, capacity, start = 2, 16, 96, 70
    heads, n = kv_heads * group, gamma + 1
    q = rng.normal(size=(heads, n, head_dim)).astype(np.float32)
    cache_k = rng.normal(size=(kv_heads, capacity, head_dim)).astype(np.float32)
    cache_v = rng.normal(size=(kv_heads, capacity, head_dim)).astype(np.float32)
    units = kv_heads if granularity == "kv" else heads
    indices = random_sets(rng, units, start, 11)
    got = run_sparse_attend(backend, q, cache_k, cache_v, start, indices)
    expected = masked_attention_reference(q, cache_k, cache_v, start, indices)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_path_with_every_row_equals_dense(backend):
    """Sets that hold the whole context turn the gather path into plain causal attention."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(8, 5, 16)).astype(np.float32)
    cache_k = rng.normal(size=(2, 64, 16)).astype(np.float32)
    cache_v = rng.normal(size=(2, 64, 16)).astype(np.float32)
    everything = np.tile(np.arange(40), (2, 1))
    got = run_sparse_attend(backend, q, cache_k, cache_v, 40, everything)
    causal_reference = masked_attention_reference(q, cache_k, cache_v, 40, everything)
    np.testing.assert_allclose(got, causal_reference, atol=2e-5)


@pytest.fixture(scope="module")
def eager_attention(model_dirs):
    """transformers' own attention probabilities for the qwen3 fixture (4 query heads, 1 KV head)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dirs["qwen3"], dtype=torch.float32, attn_implementation="eager").eval()
    ids = np.random.default_rng(1).integers(0, 320, 34).tolist()
    with torch.no_grad():
        attentions = hf(torch.tensor([ids]), output_attentions=True).attentions
    return ids, np.stack([a[0].numpy() for a in attentions])  # [layers, heads, query, key]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["kv", "query"])
@pytest.mark.parametrize("aggregation", ["max", "sum"])
def test_draft_attention_scores_match_transformers_probabilities(backend, granularity, aggregation, model_dirs, eager_attention):
    """A round's score buffer is the max (or sum) of the attention probabilities of its queries."""
    ids, probs = eager_attention
    draft = load_model(model_dirs["qwen3"], backend, max_seq_len=64)
    draft.prefill(ids[:30])
    # A round as the loop runs it: a catch-up pair, then the proposals (forced to the text's tokens).
    proposal = draft.draft(ids[30:32], 3, GREEDY, None, scores=ScoreSpec(granularity, aggregation), forced=ids[32:34] + [0])
    got = proposal.scores.numpy(34)
    round_probs = probs[:, :, 30:34, :]  # [layers, heads, round queries, keys]
    if granularity == "kv":  # one KV head: the unit pools all four query heads
        round_probs = round_probs.reshape(probs.shape[0], 1, -1, 34)
    expected = round_probs.max(axis=2) if aggregation == "max" else round_probs.sum(axis=2)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    draft.rollback(30)
    again = draft.draft(ids[30:31], 1, GREEDY, None, scores=ScoreSpec(granularity, aggregation))
    assert not again.scores.numpy(34)[:, :, 31:].any()  # a new round starts from zero


# --- index sets --------------------------------------------------------------------------------


def check_sets(sets, context, policy):
    keep = min(policy.budget_tokens(context) + policy.sink + policy.window, context)
    assert sets.shape[1] == keep
    assert sets.dtype.kind == "i"
    for row in sets:
        assert np.all(np.diff(row) > 0), "sorted and unique"
        assert row[0] >= 0 and row[-1] < context
        assert set(range(min(policy.sink, context))) <= set(row.tolist())
        assert set(range(max(0, context - policy.window), context)) <= set(row.tolist())


def backend_sets(backend, plan, layer, context, units, q, keys, scores):
    """One layer's sets from a backend's own selection (its LayerSets), as numpy."""
    if backend == "torch-cpu":
        import torch

        from sts_edge.backends.torch.selection import LayerSets

        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
        sets = LayerSets(plan, context, units, t(scores)).for_layer(layer, t(q), t(keys))
        return None if sets is None else sets.numpy()
    import mlx.core as mx

    from sts_edge.backends.mlx.selection import LayerSets

    m = lambda a: mx.array(a.astype(np.float32))  # noqa: E731
    sets = LayerSets(plan, context, units, m(scores)).for_layer(layer, m(q)[None], m(keys)[None], q.shape[-1] ** -0.5)
    return None if sets is None else np.array(sets)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", POLICY_NAMES)
@pytest.mark.parametrize("granularity", ["kv", "query"])
@pytest.mark.parametrize("context,budget,sink,window", [(200, 16, 4, 8), (200, 0.1, 0, 0), (57, 30, 3, 20), (300, 1, 1, 1)])
def test_backend_selection_meets_the_contract(backend, name, granularity, context, budget, sink, window):
    """Each backend's own selection gives the reference's sets; those hold sink, window and budget."""
    rng = np.random.default_rng(context)
    policy = MaskPolicy(name, budget=budget, sink=sink, window=window, granularity=granularity)
    kv_heads, heads, n, d = 2, 8, 5, 16
    units = kv_heads if granularity == "kv" else heads
    mapping = LayerHeadMap(np.array([0, 0]), np.tile((np.arange(units) + 1) % units, (2, 1)))  # a crossed head map
    plan = VerificationPlan(policy, mapping if name == "sts" else None)
    draft_scores = rng.random((1, units, context))
    q = rng.normal(size=(heads, n, d))
    keys = rng.normal(size=(kv_heads, context + n, d))
    want = reference_sets(plan, 1, context, units, q, keys, draft_scores)
    assert want.shape[0] == units
    check_sets(want, context, policy)
    got = backend_sets(backend, plan, 1, context, units, q, keys, draft_scores)
    check_sets(got, context, policy)
    if name == "quest":  # every token of a page has its page's score: ties fall either way in the last page
        page_scores = quest_scores(q, keys, context, granularity, policy.page_size)
        for row_got, row_want, row_scores in zip(got, want, page_scores):
            np.testing.assert_allclose(np.sort(row_scores[row_got]), np.sort(row_scores[row_want]), rtol=1e-5)
    else:
        np.testing.assert_array_equal(got, want)
    dense_layer = VerificationPlan(dataclasses.replace(policy, dense_layers=(1,)), plan.mapping)
    assert backend_sets(backend, dense_layer, 1, context, units, q, keys, draft_scores) is None


def candidate_attention_reference(q, keys, context, candidates, granularity):
    """Per unit and query, a softmax over only the candidate rows and the causal block, summed."""
    heads, n, d = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    out = np.full((candidates.shape[0], context), -np.inf)
    for unit, rows in enumerate(candidates):
        unit_heads = range(unit * group, (unit + 1) * group) if granularity == "kv" else [unit]
        kv = unit if granularity == "kv" else unit // group
        mass = np.zeros(len(rows))
        for h in unit_heads:
            for i in range(n):
                visible = np.concatenate([rows, np.arange(context, context + i + 1)])
                probs = softmax(keys[kv, visible] @ q[h, i] / np.sqrt(d))
                mass += probs[: len(rows)]
        out[unit, rows] = mass
    return out


@pytest.mark.parametrize("granularity", ["kv", "query"])
def test_candidate_attention_is_a_softmax_over_the_candidates(granularity):
    rng = np.random.default_rng(3)
    kv_heads, heads, n, d, context = 2, 6, 4, 8, 50
    q, keys = rng.normal(size=(heads, n, d)), rng.normal(size=(kv_heads, context + n, d))
    units = kv_heads if granularity == "kv" else heads
    candidates = random_sets(rng, units, context, 17)
    got = candidate_attention(q, keys, context, candidates, granularity)
    np.testing.assert_allclose(got, candidate_attention_reference(q, keys, context, candidates, granularity), rtol=1e-12)
    everything = np.tile(np.arange(context), (units, 1))  # all candidates: the oracle's dense mass
    np.testing.assert_allclose(candidate_attention(q, keys, context, everything, granularity),
                               group_attention(q, keys, context, granularity), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["kv", "query"])
@pytest.mark.parametrize("context,budget,sink,window,candidates", [
    (200, 16, 4, 8, 3), (200, 0.05, 0, 0, 4), (57, 10, 3, 20, 2), (300, 1, 1, 1, 8), (120, 20, 2, 8, 6)])
def test_two_stage_selection_meets_the_contract(backend, granularity, context, budget, sink, window, candidates):
    """The draft nominates candidates x budget positions, the block's own attention keeps the budget:
    each backend gives the reference's sets, a subset of the draft's nominations; where those
    would be every position (the last case) it nominates the most that leave some out."""
    rng = np.random.default_rng(context + candidates)
    policy = MaskPolicy("sts", budget=budget, sink=sink, window=window, granularity=granularity, candidates=candidates)
    kv_heads, heads, n, d = 2, 8, 5, 16
    units = kv_heads if granularity == "kv" else heads
    mapping = LayerHeadMap(np.array([0, 0]), np.tile((np.arange(units) + 1) % units, (2, 1)))  # a crossed head map
    plan = VerificationPlan(policy, mapping)
    draft_scores = rng.random((1, units, context))
    q = rng.normal(size=(heads, n, d)) * 2
    keys = rng.normal(size=(kv_heads, context + n, d))
    want = reference_sets(plan, 1, context, units, q, keys, draft_scores)
    check_sets(want, context, policy)
    nominations = policy.nominations(context)  # the last case: 6 x 20 + 10 would be every position, 5 x 20 + 10 not
    assert plan.at(context).policy.candidates == nominations == (5 if context == 120 else candidates)
    nominating = dataclasses.replace(policy, candidates=1, budget=nominations * policy.budget_tokens(context))
    nominated = reference_sets(VerificationPlan(nominating, mapping), 1, context, units, scores=draft_scores)
    assert all(set(row) <= set(nom) for row, nom in zip(want.tolist(), nominated.tolist()))
    one_stage = reference_sets(VerificationPlan(dataclasses.replace(policy, candidates=1), mapping), 1, context, units,
                               scores=draft_scores)
    assert not np.array_equal(want, one_stage)  # the second stage is live
    np.testing.assert_array_equal(backend_sets(backend, plan, 1, context, units, q, keys, draft_scores), want)


def test_selection_takes_the_best_scores():
    scores = np.array([[0.0, 9, 1, 8, 2, 7, 3, 0]])
    np.testing.assert_array_equal(select_indices(scores, 4, 1, 1), [[0, 1, 3, 7]])
    np.testing.assert_array_equal(select_indices(scores, 8, 1, 1), [np.arange(8)])


def record_sets(monkeypatch, backend, recorded):
    """Record every set a backend's LayerSets hands an attention layer."""
    module = "sts_edge.backends.torch.selection" if backend == "torch-cpu" else "sts_edge.backends.mlx.selection"
    import importlib

    layer_sets = importlib.import_module(module).LayerSets
    original = layer_sets.for_layer

    def recording(self, layer, *args):
        sets = original(self, layer, *args)
        host = None if sets is None else sets.numpy() if hasattr(sets, "numpy") else np.array(sets)
        recorded.append((host, self.context, self.plan.policy))
        return sets

    monkeypatch.setattr(layer_sets, "for_layer", recording)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", POLICY_NAMES + ["sts two-stage"])
def test_sets_used_in_real_generation_are_valid(backend, name, model_dirs, draft_dir, monkeypatch):
    recorded = []
    record_sets(monkeypatch, backend, recorded)
    target = load_model(model_dirs["llama3"], backend, max_seq_len=256)
    draft = load_model(draft_dir, backend, max_seq_len=256)
    prompt = np.random.default_rng(4).integers(0, 320, 120).tolist()
    policy = MaskPolicy(name.split()[0], budget=24, sink=2, window=8, dense_layers=(0,),
                        candidates=3 if name.endswith("two-stage") else 1)
    stats = GenerationStats()
    list(generate_tokens(target, prompt, SamplingParams(), 12, draft=draft, gamma=3, stats=stats, policy=policy))
    sparse = [r for r in recorded if r[0] is not None]
    assert len(recorded) == 3 * stats.rounds and len(sparse) == 2 * stats.rounds  # layers 1 and 2 of 3, every round
    for sets, context, used in sparse:
        check_sets(sets, context, used)
    # Sparsity counts what was read: layer 0 dense, layers 1-2 the 24 + 2 + 8 = 34 kept rows.
    contexts = [context for sets, context, _ in sparse[::2]]
    assert stats.kept_rows == sum(c + 2 * 34 for c in contexts)
    assert stats.dense_rows == sum(3 * c for c in contexts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_stage_nominates_fewer_where_nominees_would_cover_the_context(backend, model_dirs, draft_dir, monkeypatch):
    """The first round after a 120-token prompt, budget 24 + sink 2 + window 8: five nominations per
    token (130 rows) would be every position, so the draft nominates four (106 rows), and the sets
    are those of asking for four; they are not the one-stage sets."""
    target = load_model(model_dirs["llama3"], backend, max_seq_len=256)
    draft = load_model(draft_dir, backend, max_seq_len=256)
    prompt = np.random.default_rng(6).integers(0, 320, 120).tolist()
    first_round = {}
    for candidates in (1, 4, 5):
        recorded = []
        record_sets(monkeypatch, backend, recorded)
        policy = MaskPolicy("sts", budget=24, sink=2, window=8, candidates=candidates)
        list(generate_tokens(target, prompt, SamplingParams(), 4, draft=draft, gamma=3, policy=policy))
        first = recorded[0][1]  # the prompt but its last token, which opens the first block
        first_round[candidates] = [sets for sets, context, _ in recorded if context == first]
        assert len(first_round[candidates]) == target.config.num_hidden_layers
        monkeypatch.undo()
    assert all(np.array_equal(a, b) for a, b in zip(first_round[5], first_round[4]))
    assert not all(np.array_equal(a, b) for a, b in zip(first_round[4], first_round[1]))


# --- equivalence with dense when the budget covers the context ---------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["kv", "query"])
@pytest.mark.parametrize("candidates", [1, 3])
def test_full_budget_sts_equals_dense(backend, granularity, candidates, model_dirs, draft_dir):
    target = load_model(model_dirs["llama3"], backend, max_seq_len=256)
    draft = load_model(draft_dir, backend, max_seq_len=256)
    prompt = np.random.default_rng(5).integers(0, 320, 100).tolist()
    dense = list(generate_tokens(target, prompt, SamplingParams(), 20, draft=draft, gamma=4))
    covering = MaskPolicy("sts", budget=200, sink=4, window=16, granularity=granularity, candidates=candidates)
    stats = GenerationStats()
    sts = list(generate_tokens(target, prompt, SamplingParams(), 20, draft=draft, gamma=4, stats=stats, policy=covering))
    assert sts == dense
    assert stats.sparsity == 0.0
    sparse = list(generate_tokens(target, prompt, SamplingParams(), 20, draft=draft, gamma=4,
                                  policy=dataclasses.replace(covering, budget=8)))
    assert sparse != dense  # a small budget does change this random model's output: the path is live


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_budget_verification_logits_equal_dense(backend, model_dirs, monkeypatch):
    """Sets covering every context row, forced through the sparse gather path, give dense logits."""
    target = load_model(model_dirs["qwen2"], backend, max_seq_len=128)
    prompt = np.random.default_rng(6).integers(0, 320, 60).tolist()
    block = [11, 12, 13, 14, 15]
    target.prefill(prompt)
    dense = target.verify(block).logits()
    target.rollback(60)
    module = "sts_edge.backends.torch.selection" if backend == "torch-cpu" else "sts_edge.backends.mlx.selection"
    import importlib

    layer_sets = importlib.import_module(module).LayerSets
    every_row = np.tile(np.arange(60), (2, 1))
    if backend == "torch-cpu":
        import torch

        monkeypatch.setattr(layer_sets, "for_layer", lambda self, *args: torch.from_numpy(every_row))
    else:
        import mlx.core as mx

        monkeypatch.setattr(layer_sets, "for_layer", lambda self, *args: mx.array(every_row))
    streaming = VerificationPlan(MaskPolicy("streaming", budget=8, sink=2, window=4))
    sparse = target.verify(block, plan=streaming).logits()
    np.testing.assert_allclose(sparse, dense, atol=1e-4)


# --- recall --------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["kv", "query"])
@pytest.mark.parametrize("seed", range(5))
def test_oracle_recall_bounds_every_policy(granularity, seed):
    rng = np.random.default_rng(seed)
    kv_heads, heads, n, d, context = 2, 8, 5, 16, 300
    units = kv_heads if granularity == "kv" else heads
    q = rng.normal(size=(heads, n, d)) * 1.5
    keys = rng.normal(size=(kv_heads, context + n, d))
    mass = group_attention(q, keys, context, granularity)
    mapping = LayerHeadMap(np.array([0]), np.arange(units)[None])
    recalls = {}
    for name in POLICY_NAMES:
        policy = MaskPolicy(name, budget=32, sink=4, window=16, granularity=granularity)
        scores = rng.random((1, units, context))
        sets = reference_sets(VerificationPlan(policy, mapping if name == "sts" else None), 0, context, units, q, keys, scores)
        inside, total = attention_recall(mass, sets)
        recalls[name] = inside / total
    for name, recall in recalls.items():
        assert recall <= recalls["oracle"] + 1e-12, name
    # The oracle's sets hold, per unit, the forced sink and window plus the 32 heaviest of the rest.
    middle = np.sort(mass[:, 4 : context - 16], axis=-1)[:, -32:].sum()
    assert recalls["oracle"] == pytest.approx((mass[:, :4].sum() + mass[:, -16:].sum() + middle) / mass.sum(), abs=1e-12)
    assert recalls["streaming"] < recalls["oracle"]  # the bound is not trivially tight

    # Planted: the draft's scores are the target's own attention mass -> one-stage sts picks the
    # oracle's sets (a second stage ranks by a softmax over the nominees alone, which may reorder).
    planted = VerificationPlan(MaskPolicy("sts", budget=32, sink=4, window=16, granularity=granularity, candidates=1),
                               mapping)
    inside, total = attention_recall(mass, reference_sets(planted, 0, context, units, q, keys, mass[None]))
    assert inside / total == pytest.approx(recalls["oracle"], abs=1e-12)


def test_quest_bound_is_an_upper_bound():
    rng = np.random.default_rng(0)
    q, keys = rng.normal(size=(4, 3, 8)), rng.normal(size=(2, 40 + 3, 8))
    bound = quest_scores(q, keys, 40, "query", 16)
    exact = np.einsum("hnd,kld->hknl", q, keys[:, :40])[np.arange(4), np.arange(4) // 2].max(axis=1)
    assert np.all(bound >= exact - 1e-9)


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings,match", [
    (dict(budget=0), "budget"),
    (dict(budget=-5), "budget"),
    (dict(budget=2.5), "budget"),
    (dict(name="bigbird"), "unknown policy"),
    (dict(sink=-1), "sink"),
    (dict(granularity="layer"), "granularity"),
    (dict(aggregation="mean"), "aggregation"),
    (dict(candidates=0), "candidates"),
    (dict(candidates=2.5), "candidates"),
    (dict(candidates=True), "candidates"),
])
def test_invalid_policy_settings(settings, match):
    with pytest.raises(MaskPolicyError, match=match):
        MaskPolicy(**settings)


def test_policy_settings_that_do_not_fit_the_model(model_dirs, draft_dir):
    engine = load(model_dirs["llama3"], draft=draft_dir, backend="torch-cpu", max_seq_len=128)
    with pytest.raises(MaskPolicyError, match="window"):
        engine.generate("hello", max_tokens=2, window=500)
    with pytest.raises(MaskPolicyError, match=r"dense layers \[3\] are outside"):
        engine.generate("hello", max_tokens=2, dense_layers=[0, 3])
    with pytest.raises(MaskPolicyError, match="unknown policy"):
        engine.generate("hello", max_tokens=2, policy="nope")
    with pytest.raises(ValueError, match="needs|give a draft"):
        engine.generate("hello", max_tokens=2, use_draft=False, policy="sts")
    assert engine.generate("hello", max_tokens=2).tokens  # still serving
