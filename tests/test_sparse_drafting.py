"""Sparse drafting (MaskPolicy.drafting = "sparse", issue 19's cheaper drafting pass): a round's
first draft step reads the draft's whole cache and writes the scores; its later steps read the
draft's own sets, picked from those scores by the selection contract.

Its oracles: the output never changes (the target verifies; here its every layer reads densely,
so the output must be the target's own greedy one), a later step's logits are exactly those of the
draft verifying that token with its own plan over the first step's scores (both tested paths,
composed), and sets that cover the context give dense drafting's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sts_edge.backend import ScoreSpec, load_model
from sts_edge.mask import LayerHeadMap, MaskPolicy, MaskPolicyError, VerificationPlan
from sts_edge.sampling import GREEDY
from sts_edge.speculative import GenerationStats, generate_tokens

from fixtures.numpy_backend import NumpyModel

BACKENDS = ["torch-cpu", "mlx", pytest.param("cuda", marks=pytest.mark.gpu)]


def skip_missing(backend: str) -> None:
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")


def sparse_drafting(budget: int, target_layers: int) -> MaskPolicy:
    """sts that drafts sparsely while every target layer reads densely: the sets shape only the
    draft's proposals, never the verified output."""
    return MaskPolicy("sts", budget=budget, sink=2, window=4, dense_layers=tuple(range(target_layers)),
                      drafting="sparse")


def test_on_the_protocol_backend_the_output_is_the_targets_and_drafting_changes():
    prompt = np.random.default_rng(0).integers(0, 48, 40).tolist()
    alone = list(generate_tokens(NumpyModel(48, 96, seed=0), prompt, GREEDY, 30))
    mapping = LayerHeadMap(np.array([0]), np.array([[0]]))
    for budget, own_draft_accepts_all in ((2, False), (96, True)):
        target, draft = NumpyModel(48, 96, seed=0), NumpyModel(48, 96, seed=0)  # the target drafting for itself
        stats = GenerationStats()
        got = list(generate_tokens(target, prompt, GREEDY, 30, draft=draft, gamma=3, stats=stats,
                                   policy=sparse_drafting(budget, 1), mapping=mapping))
        assert got == alone
        # Sets of 2 + sink + window make the draft's later steps differ from the target's dense
        # ones; sets that cover the context are dense drafting.
        assert (stats.acceptance_rate == 1.0) == own_draft_accepts_all
        assert stats.drafting == "sparse"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_bits", [16, 4])
def test_sparse_drafting_never_changes_the_greedy_output(backend, kv_bits, make_model):
    skip_missing(backend)
    dtype = "float16" if backend == "cuda" else "float32"
    target_dir = make_model("llama3", head_dim=64, num_hidden_layers=3)
    draft_dir = make_model("llama3", seed=1, head_dim=64, num_hidden_layers=2)
    target = load_model(target_dir, backend, max_seq_len=256, dtype=dtype)
    prompt = np.random.default_rng(5).integers(3, 200, 120).tolist()
    alone = list(generate_tokens(target, prompt, GREEDY, 24))
    policy = sparse_drafting(16, 3)
    for draft_path in (draft_dir, target_dir):
        draft = load_model(draft_path, backend, max_seq_len=256, dtype=dtype, kv_bits=kv_bits)
        for gamma in (1, 4):
            stats = GenerationStats()
            got = list(generate_tokens(target, prompt, GREEDY, 24, draft=draft, gamma=gamma, stats=stats, policy=policy))
            assert got == alone, (draft_path.name, gamma)
            assert stats.drafting == "sparse" and "sparse drafting" in stats.summary()
            if draft_path == target_dir and gamma == 4 and kv_bits == 16:
                assert stats.acceptance_rate < 1.0  # its later steps read sets, not its whole cache


def own_plan(draft, budget: int) -> VerificationPlan:
    plan = VerificationPlan(MaskPolicy("sts", budget=budget, sink=2, window=4, drafting="sparse"),
                            LayerHeadMap.proportional(draft.config, draft.config, "kv"))
    return plan.for_draft(draft.config)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_bits", [16, 8])
def test_later_steps_read_the_sets_of_the_first_steps_scores(backend, kv_bits, make_model):
    """A sparse round's logits are, row by row, the first step's (dense, with scores) and then the
    draft verifying each forced token with its own plan over those scores; with sets that cover
    the context, dense drafting's."""
    skip_missing(backend)
    dtype = "float16" if backend == "cuda" else "float32"
    draft = load_model(make_model("llama3", seed=1, head_dim=64, num_hidden_layers=2), backend, max_seq_len=256,
                       dtype=dtype, kv_bits=kv_bits)
    prompt = np.random.default_rng(2).integers(3, 200, 150).tolist()
    forced, spec, rng = [7, 8, 9], ScoreSpec("kv", "max"), np.random.default_rng(0)
    draft.prefill(prompt)
    context = draft.length

    def sparse_round(plan):
        draft.rollback(context)
        return draft.draft([5], 3, GREEDY, rng, scores=spec, forced=forced, sparse_steps=plan).probs.logits()

    plan = own_plan(draft, 12)
    draft.rollback(context)
    first = draft.draft([5], 1, GREEDY, rng, scores=spec, forced=forced[:1])
    want = [first.probs.logits()[0]]
    for token in forced[:2]:
        want.append(draft.verify([token], GREEDY, plan, first.scores).logits()[0])
    got = sparse_round(plan)
    np.testing.assert_array_equal(got, np.stack(want))

    dense = sparse_round(None)
    assert np.abs(dense[1:] - got[1:]).max() > 1e-3  # 18 of 150 rows: the later steps read less
    np.testing.assert_array_equal(sparse_round(own_plan(draft, 200)), dense)


def test_sparse_steps_need_the_scores_they_select_from(make_model):
    draft = load_model(make_model("llama3", seed=1, head_dim=64, num_hidden_layers=2), "torch-cpu", max_seq_len=64)
    draft.prefill([3, 4, 5])
    with pytest.raises(ValueError, match="pass scores"):
        draft.draft([6], 2, GREEDY, np.random.default_rng(0), sparse_steps=own_plan(draft, 4))


def test_the_drafting_setting_is_checked_and_offered():
    from sts_edge.chat import build_parser
    from sts_edge.cli import policy_from_args

    with pytest.raises(MaskPolicyError, match="drafting must be one of"):
        MaskPolicy("sts", drafting="lazy")
    assert policy_from_args(build_parser().parse_args(["--drafting", "sparse"])).drafting == "sparse"
    assert policy_from_args(build_parser().parse_args([])).drafting == "dense"
    # Only sts drafts sparsely: other policies have no draft scores to pick the sets from.
    assert VerificationPlan(MaskPolicy("streaming", drafting="sparse")).for_draft(None) is None


def test_the_api_takes_drafting_per_call(model_dirs, draft_dir):
    from sts_edge import api

    engine = api.load(model_dirs["llama3"], draft_dir, backend="torch-cpu", max_seq_len=160)
    prompt = np.random.default_rng(3).integers(3, 200, 100).tolist()
    for drafting in ("dense", "sparse"):
        stats = GenerationStats()
        engine.generate(prompt, max_tokens=6, stats=stats, budget=8, sink=2, window=4, drafting=drafting)
        assert stats.drafting == drafting
