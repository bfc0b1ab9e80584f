"""The Triton kernels against plain float64 references (on the CPU through TRITON_INTERPRET=1).

The references here are written from the definition (softmax over an explicit key list), not
from the backend's own gather path, so a shared misreading of the layout would still show.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

from sts_edge.mask import select_indices  # noqa: E402
from sts_edge.triton_kernels.draft_attention import draft_attention_with_scores  # noqa: E402
from sts_edge.backends.torch.selection import csr_offsets, select_sets, select_sets_at  # noqa: E402
from sts_edge.triton_kernels.verify_attention import INTERPRETED, IndexLists, KernelInputError, Launch, split_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # relative Frobenius error


def reference(q, cache_k, cache_v, start, lists):
    """float64 attention of each query head over its KV head's list, plus the block (causal)."""
    heads, n, head_dim = q.shape
    kv_heads = cache_k.shape[0]
    out = torch.empty(heads, n, head_dim, dtype=torch.float64)
    for h in range(heads):
        kv = h // (heads // kv_heads)
        rows = list(range(start)) if lists is None else list(lists[kv])
        for i in range(n):
            keys = rows + list(range(start, start + i + 1))
            k = cache_k[kv, keys].double()
            v = cache_v[kv, keys].double()
            p = torch.softmax(k @ q[h, i].double() / head_dim**0.5, dim=0)
            out[h, i] = p @ v
    return out


def make_inputs(heads, kv_heads, head_dim, n, start, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    capacity = start + n + 3  # rows past the block hold junk the kernel must not read
    q = torch.randn(heads, n, head_dim, generator=gen).to(dtype)
    k = torch.randn(kv_heads, capacity, head_dim, generator=gen).to(dtype)
    v = torch.randn(kv_heads, capacity, head_dim, generator=gen).to(dtype)
    k[:, start + n :] = float("nan")
    v[:, start + n :] = float("nan")
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def ragged_lists(kv_heads, start, rng):
    """Sorted lists of mixed lengths: one of length 1, one covering the whole context, others random."""
    lengths = [1, start] + [int(rng.integers(1, start + 1)) for _ in range(kv_heads)]
    return [np.sort(rng.choice(start, size=lengths[k], replace=False)) for k in range(kv_heads)]


def rel_error(out, ref):
    out = out.double().cpu()
    assert not torch.isnan(out).any(), "kernel output has NaN (an unwritten or junk-reading element)"
    return float((out - ref).norm() / ref.norm())


CASES = [  # (heads, kv_heads, head_dim, n, dtype)
    (4, 4, 64, 2, torch.float16),  # GQA ratio 1, gamma 1
    (8, 2, 64, 5, torch.bfloat16),  # ratio 4, gamma 4
    (8, 1, 128, 9, torch.float16),  # ratio 8, gamma 8
    (16, 2, 128, 1, torch.bfloat16),  # ratio 8, a single query
    (4, 1, 128, 3, torch.bfloat16),  # ratio 4, head_dim 128
    (2, 2, 64, 7, torch.float16),
]


@pytest.mark.parametrize("heads, kv_heads, head_dim, n, dtype", CASES)
def test_sparse_verification_matches_reference(heads, kv_heads, head_dim, n, dtype):
    rng = np.random.default_rng(heads * 100 + n)
    start = 150
    q, k, v = make_inputs(heads, kv_heads, head_dim, n, start, dtype, seed=n)
    lists = ragged_lists(kv_heads, start, rng)
    flat = torch.tensor(np.concatenate(lists), dtype=torch.int32, device=DEVICE)
    offsets = torch.tensor(np.cumsum([0] + [len(x) for x in lists]), dtype=torch.int32, device=DEVICE)
    # Small splits so that lists cross several programs and some programs get nothing.
    out = split_attention(q, k, v, start, IndexLists(flat, offsets), launch=Launch(num_splits=5, block_n=16))
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_error(out, reference(q.cpu(), k.cpu(), v.cpu(), start, lists)) < TOLERANCE[dtype]


@pytest.mark.parametrize("gamma", range(1, 9))
def test_every_gamma_from_1_to_8(gamma):
    n, start = gamma + 1, 64
    rng = np.random.default_rng(gamma)
    q, k, v = make_inputs(8, 2, 64, n, start, torch.float16, seed=gamma)
    lists = ragged_lists(2, start, rng)
    flat = torch.tensor(np.concatenate(lists), dtype=torch.int32, device=DEVICE)
    offsets = torch.tensor(np.cumsum([0] + [len(x) for x in lists]), dtype=torch.int32, device=DEVICE)
    out = split_attention(q, k, v, start, IndexLists(flat, offsets), launch=Launch(num_splits=2, block_n=16))
    assert rel_error(out, reference(q.cpu(), k.cpu(), v.cpu(), start, lists)) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("heads, kv_heads, head_dim, n, dtype", CASES[:4])
def test_dense_verification_matches_reference(heads, kv_heads, head_dim, n, dtype):
    start = 97
    q, k, v = make_inputs(heads, kv_heads, head_dim, n, start, dtype, seed=7 + n)
    out = split_attention(q, k, v, start, launch=Launch(num_splits=3, block_n=32))
    assert rel_error(out, reference(q.cpu(), k.cpu(), v.cpu(), start, None)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dense", [False, True])
def test_query_tile_padded_past_the_packed_queries(dense):
    """On Hopper the launcher pads a group's 4 heads x 5 queries to a 64-row tile (warpgroup MMAs);
    the padding rows must reach neither the softmax of real rows nor the merged output."""
    heads, kv_heads, n, start = 8, 2, 5, 150
    q, k, v = make_inputs(heads, kv_heads, 64, n, start, torch.bfloat16, seed=21)
    lists = None if dense else ragged_lists(kv_heads, start, np.random.default_rng(21))
    index_lists = None if dense else IndexLists(*_lists(lists))
    out = split_attention(q, k, v, start, index_lists, launch=Launch(num_splits=3, block_m=64, block_n=16))
    assert rel_error(out, reference(q.cpu(), k.cpu(), v.cpu(), start, lists)) < TOLERANCE[torch.bfloat16]
    for bad in (8, 48):  # fewer rows than the 4 x 5 packed queries; not a power of two
        with pytest.raises(KernelInputError, match="block_m"):
            split_attention(q, k, v, start, index_lists, launch=Launch(block_m=bad))


def test_merge_takes_more_splits_than_one_pass():
    """Over 64 splits the merge folds them in several passes, rescaling as its running max grows."""
    start = 1100
    q, k, v = make_inputs(8, 2, 64, 3, start, torch.bfloat16, seed=11)
    k[:, 1000:1010] *= 4  # the largest logits sit in a late split, so the running max must move
    out = split_attention(q, k, v, start, launch=Launch(num_splits=70, block_n=16))
    assert rel_error(out, reference(q.cpu(), k.cpu(), v.cpu(), start, None)) < TOLERANCE[torch.bfloat16]


def test_device_side_start_reads_the_live_rows_with_a_larger_launch():
    """A CUDA graph's launch is sized for its bucket's `bound`; the dense path spreads the rows
    live at the device-side start over its splits and reads none past the block."""
    start, n = 150, 3
    q, k, v = make_inputs(8, 2, 64, n, start, torch.bfloat16, seed=3)
    at = torch.tensor([start], dtype=torch.int32, device=DEVICE)
    out = split_attention(q, k, v, at, bound=1000, launch=Launch(num_splits=8, block_n=16))
    assert rel_error(out, reference(q.cpu(), k.cpu(), v.cpu(), start, None)) < TOLERANCE[torch.bfloat16]


def test_empty_context_reads_only_the_block():
    q, k, v = make_inputs(4, 2, 64, 4, 0, torch.float16, seed=3)
    out = split_attention(q, k, v, 0)
    assert rel_error(out, reference(q.cpu(), k.cpu(), v.cpu(), 0, None)) < TOLERANCE[torch.float16]


def reference_scores(q, k, start, before, aggregation, granularity):
    """float64: per query head and query, probabilities over 0..start+i; then max/sum into `before`."""
    heads, n, head_dim = q.shape
    kv_heads = k.shape[0]
    length = start + n
    probs = torch.zeros(heads, n, length, dtype=torch.float64)
    for h in range(heads):
        for i in range(n):
            keys = k[h // (heads // kv_heads), : start + i + 1].double().cpu()
            probs[h, i, : start + i + 1] = torch.softmax(keys @ q[h, i].double().cpu() / head_dim**0.5, dim=0)
    per_unit = probs.reshape(kv_heads, -1, length) if granularity == "kv" else probs
    fold = per_unit.amax(1) if aggregation == "max" else per_unit.sum(1)
    expected = before.double().clone()
    expected[:, :length] = torch.maximum(expected[:, :length], fold) if aggregation == "max" else expected[:, :length] + fold
    return expected.numpy()


@pytest.mark.parametrize("aggregation", ["max", "sum"])
@pytest.mark.parametrize("granularity", ["kv", "query"])
@pytest.mark.parametrize("n", [1, 3])
def test_draft_attention_scores_match_reference(aggregation, granularity, n):
    heads, kv_heads, head_dim, start = 8, 2, 64, 120
    q, k, v = make_inputs(heads, kv_heads, head_dim, n, start, torch.bfloat16, seed=11)
    units = kv_heads if granularity == "kv" else heads
    before = torch.rand(units, start + n + 8, generator=torch.Generator().manual_seed(1)) * 0.05
    scores = before.clone().to(DEVICE)
    out = draft_attention_with_scores(q, k, v, start, scores, aggregation, granularity)
    assert rel_error(out, reference(q.cpu(), k.cpu(), v.cpu(), start, None)) < TOLERANCE[torch.bfloat16]
    expected = reference_scores(q, k, start, before, aggregation, granularity)
    np.testing.assert_allclose(scores.cpu().double().numpy(), expected, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("aggregation", ["max", "sum"])
def test_draft_scores_over_many_tiles_at_a_device_side_start(aggregation):
    """The kernel stores probabilities relative to the running max of each 128-row tile; here a split
    covers several tiles, the running max moves inside one (large keys late in the context), and a
    graph-sized launch (`bound` past the start) puts the block's own maxima in a later column."""
    heads, kv_heads, head_dim, n, start = 8, 2, 64, 3, 700
    q, k, v = make_inputs(heads, kv_heads, head_dim, n, start, torch.bfloat16, seed=5)
    k[:, 300:305] *= 3
    k[:, 560:570] *= 4
    before = torch.rand(kv_heads, start + n + 8, generator=torch.Generator().manual_seed(2)) * 1e-3
    expected = reference_scores(q, k, start, before, aggregation, "kv")
    for at, bound in ((start, None), (torch.tensor([start], dtype=torch.int32, device=DEVICE), 1000)):
        scores = torch.zeros(kv_heads, 1000 + n + 8, device=DEVICE)
        scores[:, : start + n + 8] = before.to(DEVICE)
        out = draft_attention_with_scores(q, k, v, at, scores, aggregation, bound=bound, num_splits=2)
        assert rel_error(out, reference(q.cpu(), k.cpu(), v.cpu(), start, None)) < TOLERANCE[torch.bfloat16]
        np.testing.assert_allclose(scores[:, : start + n + 8].cpu().double().numpy(), expected, rtol=1e-3, atol=1e-7)
        assert not scores[:, start + n + 8 :].any()  # nothing past the live rows


@pytest.mark.parametrize("context, budget", [(300, 40), (300, 1), (90, 50), (50, 10)])
def test_selection_matches_numpy_reference(context, budget):
    gen = torch.Generator().manual_seed(context + budget)
    scores = torch.rand(3, 4, context + 5, generator=gen)
    sets = select_sets(scores.to(DEVICE), context, budget, sink=4, window=16)
    keep = min(budget + 20, context)
    if keep >= context:
        assert sets is None  # the budget covers the context: the layer runs dense
        return
    assert sets.dtype == torch.int32 and sets.shape == (3, 4, keep)
    for layer in range(3):
        expected = select_indices(scores[layer, :, :context].numpy(), keep, 4, 16)
        np.testing.assert_array_equal(sets[layer].cpu().numpy(), expected)


@pytest.mark.parametrize("context, sink, window", [(300, 4, 16), (129, 0, 16), (200, 4, 0), (512, 1, 64)])
def test_selection_at_a_device_side_context_matches_numpy_reference(context, sink, window):
    """The form a CUDA graph replays: candidates up to `bound`, those from context - window on
    masked out (the round's own tokens sit there in the draft's buffer, with scores)."""
    bound, budget = 512, 40
    scores = torch.rand(3, 4, bound + 7, generator=torch.Generator().manual_seed(context)) + 1.0
    scores[..., context:] += 10.0  # past the context: scores that must not win
    sets = select_sets_at(scores.to(DEVICE), torch.tensor([context], dtype=torch.int32, device=DEVICE), bound,
                          budget, sink, window)
    keep = budget + sink + window
    assert sets.dtype == torch.int32 and sets.shape == (3, 4, keep)
    for layer in range(3):
        expected = select_indices(scores[layer, :, :context].numpy(), keep, sink, window)
        np.testing.assert_array_equal(sets[layer].cpu().numpy(), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity, n, head_dim, budget, on_device", [
    ("kv", 5, 64, 40, False), ("kv", 1, 128, 100, True), ("query", 3, 64, 30, True), ("kv", 9, 128, 70, True)])
def test_two_stage_kernel_keeps_the_references_best_candidates(dtype, granularity, n, head_dim, budget, on_device):
    """The second stage's kernel against mask.candidate_attention (float64) and select_indices:
    valid sorted sets of the nominated rows with sink and window, whose other rows carry the
    reference's largest masses (compared as masses, so a float32 near-tie may fall either way)."""
    from sts_edge.mask import candidate_attention
    from sts_edge.triton_kernels.two_stage import refine_sets_kernel

    heads, kv_heads, start, sink, window = 8, 2, 900, 4, 16
    generator = torch.Generator().manual_seed(n * head_dim + budget)
    q = (torch.randn(heads, n, head_dim, generator=generator) * 2).to(dtype)
    cache_k = torch.randn(kv_heads, start + 32, head_dim, generator=generator).to(dtype)
    units = kv_heads if granularity == "kv" else heads
    middle = [torch.randperm(start - sink - window, generator=generator)[: 3 * budget] + sink for _ in range(units)]
    forced = torch.cat((torch.arange(sink), torch.arange(start - window, start)))
    nominated = torch.stack([torch.cat((forced, rows)).sort().values for rows in middle]).to(torch.int32)
    at = torch.tensor([start], dtype=torch.int32, device=DEVICE) if on_device else start
    got = refine_sets_kernel(q.to(DEVICE), cache_k.to(DEVICE), at, nominated.to(DEVICE), budget, sink, window).cpu().numpy()
    mass = candidate_attention(q.double().numpy(), cache_k.double().numpy(), start, nominated.numpy(), granularity)
    want = select_indices(mass, budget + sink + window, sink, window)
    assert got.shape == want.shape and got.dtype == np.int32
    for row_got, row_want, row_nominated, row_mass in zip(got, want, nominated.numpy(), mass):
        assert np.all(np.diff(row_got) > 0) and set(row_got) <= set(row_nominated) and set(forced.tolist()) <= set(row_got)
        np.testing.assert_allclose(np.sort(row_mass[row_got][sink:-window]), np.sort(row_mass[row_want][sink:-window]),
                                   rtol=2e-3)  # ranked to one part in 1024


@pytest.mark.parametrize("spread", ["close_keys", "many_octaves", "small_and_zero", "ties", "ties_at_threshold"])
def test_two_stage_keep_kernel_matches_numpy_top_budget(spread):
    """The keep kernel's threshold search against a numpy top budget, on masses it ranks exactly
    (float32 with its KEY_SHIFT low mantissa bits zero, within 2^-FLOOR_OCTAVES of the largest): distinct ones against
    select_indices; with ties, the largest first and equal ones by position (all equal; and 30
    distinct large masses among 970 equal smaller ones, so the ties at the threshold outnumber
    the room and rows above it follow skipped ties)."""
    from sts_edge.triton_kernels.two_stage import FLOOR_OCTAVES, KEY_SHIFT, keep_heaviest

    shift, octaves = KEY_SHIFT.value, FLOOR_OCTAVES.value
    keys_end = octaves << (23 - shift)  # the largest key: a mass 2^octaves above the floor
    units, sink, window, budget, middle = 3, 4, 16, 70, 1000
    generator = np.random.default_rng(len(spread))
    keys = {"close_keys": lambda: keys_end // 2 + generator.permutation(256)[:200],
            "many_octaves": lambda: generator.permutation(keys_end)[:middle],
            "small_and_zero": lambda: np.concatenate((generator.permutation(3000)[:500], np.zeros(middle - 500, int))),
            "ties": lambda: np.full(middle, keys_end // 5),
            "ties_at_threshold": lambda: generator.permutation(np.concatenate((keys_end // 2 + np.arange(30),
                                                                                np.full(middle - 30, keys_end // 3))))}
    mass, nominated, ranked = [], [], []
    for _ in range(units):
        key = keys[spread]()
        # a key k is the float whose bits are k << shift above the floor 2^-octaves below the unit's top
        bits = ((127 - 40) << 23) + (key.astype(np.int64) << shift)
        if spread == "small_and_zero":
            bits = np.where(key > 0, bits, 0)  # exact zeros, as masked candidates are
        rows = np.sort(generator.permutation(np.arange(sink, 5000))[: len(key)])
        nominated.append(np.concatenate((np.arange(sink), rows, 5000 + np.arange(window))))
        mass.append(np.concatenate((np.zeros(sink), bits.astype(np.int32).view(np.float32), np.zeros(window))))
        best = np.lexsort((np.arange(len(key)), -key))[:budget]  # largest key first, then earliest
        ranked.append(np.concatenate((np.arange(sink), np.sort(best) + sink, np.arange(window) + sink + len(key))))
    nominated = torch.tensor(np.stack(nominated), dtype=torch.int32, device=DEVICE)
    mass = torch.tensor(np.stack(mass), dtype=torch.float32, device=DEVICE)
    got = keep_heaviest(mass, nominated, budget, sink, window).cpu().numpy()
    if spread.startswith("ties"):
        want = np.stack(ranked)
    else:
        want = select_indices(mass.cpu().numpy(), budget + sink + window, sink, window)
        np.testing.assert_array_equal(want, np.stack(ranked))  # the two references agree on distinct masses
    np.testing.assert_array_equal(got, np.take_along_axis(nominated.cpu().numpy(), want, axis=1))


def test_selected_sets_feed_the_kernel():
    """Selection and verification together equal attention over the chosen rows."""
    heads, kv_heads, head_dim, n, start = 8, 2, 64, 5, 200
    q, k, v = make_inputs(heads, kv_heads, head_dim, n, start, torch.float16, seed=5)
    sets = select_sets(torch.rand(kv_heads, start, device=DEVICE), start, 30, sink=4, window=8)
    lists = IndexLists(sets.flatten(), csr_offsets(kv_heads, sets.shape[1], q.device), sets.shape[1])
    out = split_attention(q, k, v, start, lists)
    lists = [s.cpu().numpy() for s in sets]
    assert rel_error(out, reference(q.cpu(), k.cpu(), v.cpu(), start, lists)) < TOLERANCE[torch.float16]


def _lists(rows, device=DEVICE):
    flat = torch.tensor([r for row in rows for r in row], dtype=torch.int32, device=device)
    offsets = torch.tensor(np.cumsum([0] + [len(r) for r in rows]), dtype=torch.int32, device=device)
    return flat, offsets


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(lists=_lists([[3, 2, 5], [1, 2]])), "sorted"),
        (lambda a: a.update(lists=_lists([[1, 1, 5], [1, 2]])), "sorted"),
        (lambda a: a.update(lists=_lists([[1, 2, 40], [1, 2]])), "committed context"),
        (lambda a: a.update(lists=_lists([[-1, 2], [1, 2]])), "committed context"),
        (lambda a: a.update(lists=(_lists([[1, 2], [3]])[0].long(), _lists([[1, 2], [3]])[1])), "int32"),
        (lambda a: a.update(lists=(_lists([[1, 2], [3]])[0], torch.tensor([0, 2], dtype=torch.int32))), "offsets"),
        (lambda a: a.update(q=a["q"].float()), "bfloat16 or float16"),
        (lambda a: a.update(q=a["q"].half()), "bfloat16 or float16"),
        (lambda a: a.update(q=torch.zeros(4, 2, 96, dtype=torch.bfloat16)), "head_dim"),
        (lambda a: a.update(q=torch.zeros(3, 2, 64, dtype=torch.bfloat16)), "multiple of KV heads"),
        (lambda a: a.update(q=torch.zeros(4, 17, 64, dtype=torch.bfloat16)), "queries"),
        (lambda a: a.update(start=39), "do not fit"),
        (lambda a: a.update(q=a["q"][0]), "expected q"),
    ],
)
def test_invalid_inputs_raise_clear_errors(change, message):
    args = {"q": torch.zeros(4, 2, 64, dtype=torch.bfloat16), "k": torch.zeros(2, 40, 64, dtype=torch.bfloat16),
            "start": 30, "lists": _lists([[1, 2, 5], [0, 7]], device="cpu")}
    change(args)
    with pytest.raises(KernelInputError, match=message):
        split_attention(args["q"], args["k"], args["k"], args["start"], IndexLists(*args["lists"]))


def test_every_gamma_fits_the_kernels():
    """The loop's gamma limit and the kernels' query tile are set in two places; they must agree."""
    from sts_edge.speculative import MAX_GAMMA
    from sts_edge.triton_kernels.verify_attention import MAX_QUERIES

    assert MAX_GAMMA + 1 == MAX_QUERIES


def test_bad_score_buffer_and_selection_arguments():
    q, k, v = make_inputs(4, 2, 64, 1, 20, torch.bfloat16, seed=2)
    with pytest.raises(KernelInputError, match="scores must be float32"):
        draft_attention_with_scores(q, k, v, 20, torch.zeros(2, 10, device=DEVICE))
    with pytest.raises(KernelInputError, match="aggregation"):
        draft_attention_with_scores(q, k, v, 20, torch.zeros(2, 30, device=DEVICE), aggregation="mean")
    with pytest.raises(ValueError, match="budget"):
        select_sets(torch.rand(2, 50), 50, 0, 4, 4)
    with pytest.raises(ValueError, match="fewer than the context"):
        select_sets(torch.rand(2, 50), 60, 8, 4, 4)


def test_layer_sets_select_the_reference_sets_from_device_scores():
    """The backend's sts selection (all draft layers at once, on the device, mapped per target layer)
    equals the contract's numpy reference, for a crossed head map."""
    from sts_edge.backends.torch.selection import LayerSets
    from sts_edge.config import ModelConfig
    from sts_edge.mask import LayerHeadMap, MaskPolicy, VerificationPlan, reference_sets

    target = ModelConfig.from_dict({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                    "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "vocab_size": 100})
    draft = ModelConfig.from_dict({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "vocab_size": 100})
    mapping = LayerHeadMap.proportional(target, draft, "kv")
    mapping.head_map[1] = [1, 0]  # a crossed head map, as calibration can produce
    # one stage: the mapped draft sets themselves (the second stage would read the unused q and keys)
    plan = VerificationPlan(MaskPolicy("sts", budget=20, sink=2, window=8, candidates=1), mapping)
    scores = np.random.default_rng(0).random((3, 2, 120)).astype(np.float32)
    on_device = LayerSets(plan, 120, 2, torch.from_numpy(scores).to(DEVICE))
    unused = torch.zeros(1)
    for layer in range(6):
        np.testing.assert_array_equal(on_device.for_layer(layer, unused, unused).cpu().numpy(),
                                      reference_sets(plan, layer, 120, 2, scores=scores))


def _two_rounds(target_dir, draft_dir, backend, dtype, draft_kv_bits: int = 16, budget: int = 24,
                candidates: int = 1) -> list[np.ndarray]:
    """Prefill, then two draft-and-verify rounds with STS sets (the second from a later position,
    so captured graphs are replayed at a new start): every logits array along the way."""
    from sts_edge import load
    from sts_edge.backend import ScoreSpec
    from sts_edge.mask import LayerHeadMap, MaskPolicy, VerificationPlan
    from sts_edge.sampling import GREEDY

    engine = load(target_dir, draft=draft_dir, backend=backend, max_seq_len=320, dtype=dtype, draft_kv_bits=draft_kv_bits)
    target, draft = engine.target, engine.draft
    prompt = np.random.default_rng(0).integers(3, 200, 180).tolist()
    target.prefill(prompt)
    draft.prefill(prompt)
    plan = VerificationPlan(MaskPolicy("sts", budget=budget, sink=2, window=8, candidates=candidates),
                            LayerHeadMap.proportional(target.config, draft.config, "kv"))
    out = []
    for block in ([5, 6, 7, 8, 9], [11, 12, 13, 14, 15]):
        proposal = draft.draft(block[:1], 4, GREEDY, None, scores=ScoreSpec("kv", "max"), forced=block[1:])
        out.append(proposal.probs.logits())
        out.append(target.verify(block, GREEDY, plan, proposal.scores).logits())
        target.rollback(target.length - 3)  # two of the block's tokens are kept
        draft.rollback(target.length)
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the model routes attention to the kernels on a GPU only")
@pytest.mark.parametrize("draft_kv_bits, candidates", [(16, 1), (8, 1), (16, 3), (16, 9)])
def test_model_on_gpu_gives_the_plain_paths_logits(make_model, monkeypatch, draft_kv_bits, candidates):
    """Draft scores, device selection and sparse verification through the kernels, replayed as
    CUDA graphs, then eagerly, against the same model with kernels and graphs off (plain paths;
    an 8-bit draft cache decoded to rows there, read quantized by the kernels).

    The paths' float16 roundings differ by an ulp here and there before a quantized cache's keys
    are quantized (fused kernels against PyTorch's ops), and an ulp that moves a group's minimum
    moves every key of the group by up to a level. The draft's logits stay close, but its scores
    move enough to flip a near-tie in STS's sets, so with 8 bits the verification's budget covers
    the context; and not 4 bits, where a level is a fifteenth of the group's range and the runs
    drift apart by design. test_kernels_read_quantized_caches_as_the_rows_they_decode_to checks
    the kernels on 4- and 8-bit rows exactly, tests/test_layer_ops.py the quantized write. With
    two-stage selection (candidates 3) the second stage runs inside the verification graph; with 9,
    whose nominees would cover the 180-token context, the graph holds seven per budget token."""
    import sts_edge.backends.torch.model as torch_model

    target_dir = make_model("llama3", head_dim=64, num_hidden_layers=3)
    draft_dir = make_model("llama3", seed=1, head_dim=64, num_hidden_layers=2)
    budget = 24 if draft_kv_bits == 16 else 320
    graphed = _two_rounds(target_dir, draft_dir, "cuda", "float16", draft_kv_bits, budget, candidates)
    monkeypatch.setenv("STS_EDGE_CUDA_GRAPHS", "0")
    eager = _two_rounds(target_dir, draft_dir, "cuda", "float16", draft_kv_bits, budget, candidates)
    monkeypatch.setattr(torch_model, "use_kernels", lambda *args: False)
    plain = _two_rounds(target_dir, draft_dir, "cuda", "float16", draft_kv_bits, budget, candidates)
    for got_graphed, got_eager, want in zip(graphed, eager, plain):
        np.testing.assert_allclose(got_eager, want, rtol=2e-2, atol=2e-2)
        np.testing.assert_allclose(got_graphed, want, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the model routes attention to the kernels on a GPU only")
@pytest.mark.parametrize("gamma, draft_kv_bits", [(1, 16), (4, 16), (8, 16), (4, 8), (4, 4)])
@pytest.mark.parametrize("draft_kind", ["other-model", "target-itself"])
def test_speculative_greedy_on_gpu_equals_the_targets_own_greedy(make_model, gamma, draft_kind, draft_kv_bits):
    """The speculative oracle on the kernel path (float16, CUDA graphs): every token that verifying
    gamma + 1 tokens per block yields is the one the target picks stepping one token at a time after
    the same prefix (with the target as its own draft, blocks are accepted whole, so every verified
    row counts).

    In float16 a block and a single step may round the same logit differently (different matrix
    shapes), and a random model has near-ties. Where the two disagree, the float32 plain path on
    the CPU must call it a tie. The exact oracle, in float32, is test_speculative.py's."""
    from sts_edge.backend import load_model
    from sts_edge.sampling import SamplingParams
    from sts_edge.speculative import GenerationStats, generate_tokens

    target_dir = make_model("llama3", head_dim=64, num_hidden_layers=3)
    draft_dir = make_model("llama3", seed=1, head_dim=64, num_hidden_layers=2)
    prompt = np.random.default_rng(5).integers(3, 200, 150).tolist()
    target = load_model(target_dir, "cuda", max_seq_len=320, dtype="float16")
    draft = load_model(draft_dir if draft_kind == "other-model" else target_dir, "cuda", max_seq_len=320, dtype="float16",
                       kv_bits=draft_kv_bits)
    stats = GenerationStats()
    got = list(generate_tokens(target, prompt, SamplingParams(), 60, draft=draft, gamma=gamma, stats=stats))
    assert len(got) == 60

    stepper = load_model(target_dir, "cuda", max_seq_len=320, dtype="float16")
    referee = load_model(target_dir, "torch-cpu", max_seq_len=320, dtype="float32")
    logits, ties = stepper.prefill(prompt).logits()[0], 0
    for i, token in enumerate(got):
        own = int(logits.argmax())
        if own != token:
            referee.rollback(0)
            exact = referee.prefill(prompt + got[:i]).logits()[0]
            gap = abs(float(exact[own] - exact[token]))
            assert gap < 1e-2 and exact.max() - max(exact[own], exact[token]) < 1e-2, (
                f"token {i}: speculative {token}, the target's own step {own}; float32 logits "
                f"{exact[token]:.4f} / {exact[own]:.4f}, best {exact.max():.4f}: not a tie")
            ties += 1
        logits = stepper.prefill([token]).logits()[0]
    assert ties <= 2  # near-ties are rare; many would mean the block path's logits are off
    if draft_kind == "target-itself":  # a quantized cache may cost the draft a little agreement
        assert stats.acceptance_rate > {16: 0.9, 8: 0.6, 4: 0.4}[draft_kv_bits]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors through the interpreter; on a GPU "
                    "test_model_on_gpu_gives_the_plain_paths_logits covers this path, captured")
def test_device_side_start_matches_the_plain_paths(make_model):
    """The form a CUDA graph captures (position as a device tensor, launch shape from a bound),
    run through the kernels on the CPU, against the same forward at a Python int position."""
    from sts_edge import load
    from sts_edge.backend import ScoreSpec
    from sts_edge.backends.torch.attention import ScoreBuffer
    from sts_edge.backends.torch.model import Reads
    from sts_edge.backends.torch.selection import LayerSets
    from sts_edge.mask import LayerHeadMap, MaskPolicy, VerificationPlan

    target_dir = make_model("llama3", head_dim=64, num_hidden_layers=3)
    draft_dir = make_model("llama3", seed=1, head_dim=64, num_hidden_layers=2)
    engine = load(target_dir, draft=draft_dir, backend="torch-cpu", max_seq_len=320, dtype="float16")
    target, draft = engine.target, engine.draft
    prompt = np.random.default_rng(1).integers(3, 200, 150).tolist()
    target.prefill(prompt)
    draft.prefill(prompt)
    start, device_start, bound = 150, torch.tensor([150], dtype=torch.int32), 256
    ids = torch.tensor([7])
    spec = ScoreSpec("kv", "max")
    with torch.inference_mode():
        # Draft step with scores: plain path (int start) vs kernels (device start).
        buffers = [ScoreBuffer(torch.zeros(2, 2, 320), spec), ScoreBuffer(torch.zeros(2, 2, 320), spec)]
        want = draft.model(ids, start, False, Reads(scores=buffers[0]))
        got = draft.model(ids, device_start, False, Reads(scores=buffers[1]), bound=bound)
        np.testing.assert_allclose(got.float().numpy(), want.float().numpy(), rtol=2e-2, atol=2e-2)
        np.testing.assert_allclose(buffers[1].buffer.numpy(), buffers[0].buffer.numpy(), rtol=2e-2, atol=1e-4)

        # Verification with STS sets: selection at an int context (plain path) vs at the device
        # start over the whole score buffer, as a graph replays it (kernels).
        plan = VerificationPlan(MaskPolicy("sts", budget=24, sink=2, window=8),
                                LayerHeadMap.proportional(target.config, draft.config, "kv"))
        block = torch.tensor([5, 6, 7, 8, 9])
        eager = LayerSets(plan, start, 2, buffers[0].buffer)
        want = target.model(block, start, True, Reads(sets=eager))
        captured = LayerSets(plan, device_start, 2, buffers[0].buffer, bound)
        got = target.model(block, device_start, True, Reads(sets=captured), bound=bound)
        np.testing.assert_array_equal(captured.draft_sets.numpy(), eager.draft_sets.numpy())
        np.testing.assert_allclose(got.float().numpy(), want.float().numpy(), rtol=2e-2, atol=2e-2)


def quantized_cache(cache: torch.Tensor, bits: int, group_size: int, decoded_dtype: torch.dtype | None = None):
    """(QuantizedRows of a cache, the cache those rows decode to, in `decoded_dtype` or the
    cache's). The centres are the live rows' channel means (junk rows are NaN) moved by a few units
    per KV head and channel, so that a centre read from the wrong head or channel shows."""
    from sts_edge.backends.torch.quantized_kv import dequantize_rows, quantize_rows
    from sts_edge.triton_kernels.verify_attention import QuantizedRows

    kv_heads, _, head_dim = cache.shape
    shift = 4 * torch.randn(kv_heads, head_dim, generator=torch.Generator().manual_seed(bits)).to(cache.device)
    centres = (torch.nanmean(cache.float(), 1) + shift).contiguous()
    parts = quantize_rows(cache, bits, group_size, centres[:, None])
    return (QuantizedRows(*parts, centres, bits, group_size),
            dequantize_rows(*parts, bits, group_size, centres[:, None], decoded_dtype or cache.dtype))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("head_dim, group_size", [(64, 32), (128, 32), (64, 16), (128, 64)])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_read_quantized_caches_as_the_rows_they_decode_to(bits, head_dim, group_size, n, dtype):
    """Dense and sparse attention and the draft's scores over a cache quantized to 8 or 4 bits
    equal the same over its decoded rows (the junk rows past the block stay unread: NaN there):
    8-bit rows decoded and rounded to the model's dtype, as the kernels decode them; 4-bit rows
    exactly (float32), since the kernels multiply their codes instead of decoding them."""
    if dtype == torch.bfloat16 and INTERPRETED and bits == 8:
        pytest.skip("Triton's interpreter converts float32 to bfloat16 by truncation, not rounding "
                    "(the GPU rounds, as the reference does)")
    heads, kv_heads, start = 8, 2, 150
    q, k, v = make_inputs(heads, kv_heads, head_dim, n, start, dtype, seed=bits + n)
    decoded_dtype = torch.float32 if bits == 4 else None
    (k_rows, k_decoded), (v_rows, v_decoded) = (quantized_cache(k, bits, group_size, decoded_dtype),
                                                quantized_cache(v, bits, group_size, decoded_dtype))
    assert torch.isnan(k_decoded[:, start + n :]).all()
    want = reference(q.cpu(), k_decoded.cpu(), v_decoded.cpu(), start, None)
    assert rel_error(split_attention(q, k_rows, v_rows, start), want) < TOLERANCE[dtype]
    lists = ragged_lists(kv_heads, start, np.random.default_rng(bits))
    flat = torch.tensor(np.concatenate(lists), dtype=torch.int32, device=DEVICE)
    offsets = torch.tensor(np.cumsum([0] + [len(x) for x in lists]), dtype=torch.int32, device=DEVICE)
    assert rel_error(split_attention(q, k_rows, v_rows, start, IndexLists(flat, offsets)),
                     reference(q.cpu(), k_decoded.cpu(), v_decoded.cpu(), start, lists)) < TOLERANCE[dtype]
    before = torch.rand(kv_heads, start + n + 8, generator=torch.Generator().manual_seed(3)) * 0.05
    expected = reference_scores(q, k_decoded, start, before, "max", "kv")
    for at, bound in ((start, None), (torch.tensor([start], dtype=torch.int32, device=DEVICE), 200)):
        scores = torch.zeros(kv_heads, 200 + n + 8, device=DEVICE)
        scores[:, : start + n + 8] = before.to(DEVICE)
        out = draft_attention_with_scores(q, k_rows, v_rows, at, scores, "max", "kv", bound=bound)
        assert rel_error(out, want) < TOLERANCE[dtype]
        np.testing.assert_allclose(scores[:, : start + n + 8].cpu().double().numpy(), expected, rtol=1e-3, atol=1e-6)


def test_quantized_caches_are_checked():
    q, k, v = make_inputs(4, 2, 64, 2, 20, torch.bfloat16, seed=0)
    k_rows, _ = quantized_cache(k, 4, 32)
    with pytest.raises(KernelInputError, match="both be quantized"):
        split_attention(q, k_rows, v, 20)
    v_rows, _ = quantized_cache(v, 8, 32)
    with pytest.raises(KernelInputError, match="quantized alike"):
        split_attention(q, k_rows, v_rows, 20)
    bad = type(k_rows)(k_rows.values, k_rows.scales[:, :, :1], k_rows.biases[:, :, :1], k_rows.centres, 4, 32)
    with pytest.raises(KernelInputError, match="scales and biases"):
        split_attention(q, bad, bad, 20)
    bad = type(k_rows)(k_rows.values, k_rows.scales.bfloat16(), k_rows.biases.bfloat16(), k_rows.centres, 4, 32)
    with pytest.raises(KernelInputError, match="float32"):
        split_attention(q, bad, bad, 20)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs an NVIDIA GPU")])])
@pytest.mark.parametrize("start", [0, 64, 1000])
def test_a_prefill_chunk_is_causal_from_the_bottom_right(device, start):
    """A prompt chunk after `start` cached rows (GQA, bfloat16) against float32 attention with the
    explicit mask built here: query i sees keys 0..start + i, never an upper-left causal."""
    from sts_edge.backends.torch.attention import dense_attend

    gen = torch.Generator().manual_seed(start)
    n, heads, kv_heads, head_dim = 96, 8, 2, 128
    q, k, v = (torch.randn(h, length, head_dim, generator=gen)
               for h, length in ((heads, n), (kv_heads, start + n), (kv_heads, start + n)))
    visible = torch.arange(start + n)[None, :] <= torch.arange(start, start + n)[:, None]
    logits = (q @ k.repeat_interleave(heads // kv_heads, 0).transpose(1, 2)) * head_dim**-0.5
    want = logits.masked_fill(~visible, float("-inf")).softmax(-1) @ v.repeat_interleave(heads // kv_heads, 0)
    got = dense_attend(*(t.to(device, torch.bfloat16) for t in (q, k, v)), start)
    np.testing.assert_allclose(got.float().cpu().numpy(), want.numpy(), rtol=3e-2, atol=3e-2)
