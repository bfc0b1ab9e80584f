"""cpu_kernels/decode_attention.cpp against attention written out in float64 numpy, key by key.

bfloat16 runs on AMX tiles where the CPU has them (`amx=True`, the default) and on the AVX2 loops
otherwise; both are tested wherever the CPU can run them."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def decode_attention():
    from sts_edge.cpu_kernels.extension import attention_kernel, unavailable_reason

    if attention_kernel() is None:
        pytest.skip(f"the CPU kernels are unavailable here: {unavailable_reason()}")
    return attention_kernel()


def reference(q, cache_k, cache_v, start, sets=None):
    """Outputs [heads, n, head_dim] and probabilities [heads, n, start + n] (zero where unseen), float64.
    With sets [units, kept], unit u's query heads read those rows and the block's, causally."""
    q, k, v = (t.double().numpy() for t in (q, cache_k, cache_v))
    heads, n, head_dim = q.shape
    units = k.shape[0] if sets is None else sets.shape[0]
    out = np.zeros((heads, n, head_dim))
    probs = np.zeros((heads, n, start + n))
    for h in range(heads):
        unit = h // (heads // units)
        kv_head = unit // (units // k.shape[0])
        for i in range(n):
            rows = np.arange(start + i + 1) if sets is None else np.concatenate([sets[unit].numpy(), np.arange(start, start + i + 1)])
            logits = k[kv_head, rows] @ q[h, i] / np.sqrt(head_dim)
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out[h, i] = p @ v[kv_head, rows]
            probs[h, i, rows] = p
    return out, probs


def random_case(heads, kv_heads, head_dim, n, start, dtype, seed, capacity_extra=7):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, n, head_dim, generator=gen).to(dtype)
    # Keys of different sizes per row make the logits spread out as real ones do.
    k = (torch.randn(kv_heads, start + n + capacity_extra, head_dim, generator=gen) * 2).to(dtype)
    v = torch.randn(kv_heads, start + n + capacity_extra, head_dim, generator=gen).to(dtype)
    return q, k, v


def random_sets(units, start, kept, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(start, generator=gen)[:kept].sort().values for _ in range(units)])


# The outputs' rounding; on AMX also the probabilities' rounding to bfloat16 before the values.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}
DTYPES = [(torch.float32, False), (torch.float16, False), (torch.bfloat16, False), (torch.bfloat16, True)]


@pytest.mark.parametrize("dtype, amx", DTYPES, ids=["float32", "float16", "bfloat16", "bfloat16-amx"])
@pytest.mark.parametrize("head_dim", [64, 128, 40])
@pytest.mark.parametrize("n", [1, 3, 5, 16])
def test_dense_attention_equals_the_reference(decode_attention, dtype, amx, head_dim, n):
    q, k, v = random_case(12, 2, head_dim, n, 197, dtype, seed=n + head_dim)
    want, _ = reference(q, k, v, 197)
    got = decode_attention(q, k, v, 197, None, None, True, False, amx).double().numpy()
    tolerance = TOLERANCE[dtype] * (2 if amx else 1)
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("units", ["kv", "query"])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("dtype, amx", [(torch.float32, False), (torch.bfloat16, True)], ids=["float32", "bfloat16-amx"])
def test_attention_over_index_sets_equals_the_reference(decode_attention, units, n, dtype, amx):
    q, k, v = random_case(8, 2, 64, n, 300, dtype, seed=3)
    sets = random_sets(2 if units == "kv" else 8, 300, 70, seed=4)
    want, _ = reference(q, k, v, 300, sets)
    got = decode_attention(q, k, v, 300, sets, None, True, False, amx).double().numpy()
    tolerance = TOLERANCE[dtype] * (2 if amx else 1)
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("aggregation", ["max", "sum"])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("dtype, amx", [(torch.float32, False), (torch.bfloat16, True)], ids=["float32", "bfloat16-amx"])
def test_scores_fold_the_probabilities_into_the_running_row(decode_attention, aggregation, per_head, dtype, amx):
    heads, kv_heads, n, start = 6, 2, 3, 150
    q, k, v = random_case(heads, kv_heads, 32, n, start, dtype, seed=5)
    gen = torch.Generator().manual_seed(6)
    scores = torch.rand(heads if per_head else kv_heads, start + n + 7, generator=gen) * 0.01
    before = scores.clone().double().numpy()
    _, probs = reference(q, k, v, start)
    pooled = probs.reshape(kv_heads, -1, start + n) if not per_head else probs  # [units, rows, keys]
    folded = pooled.max(axis=1) if aggregation == "max" else pooled.sum(axis=1)
    want = before.copy()
    want[:, : start + n] = np.maximum(before[:, : start + n], folded) if aggregation == "max" else before[:, : start + n] + folded
    decode_attention(q, k, v, start, None, scores, aggregation == "max", per_head, amx)
    np.testing.assert_allclose(scores.double().numpy(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype, amx", DTYPES, ids=["float32", "float16", "bfloat16", "bfloat16-amx"])
def test_a_blocks_rows_get_the_single_steps_bits(decode_attention, dtype, amx):
    """Row i of a block at `start` is the single step at start + i, bit for bit, at any block size
    and thread count: speculative greedy output depends on it."""
    q, k, v = random_case(12, 2, 128, 16, 1000, dtype, seed=7)

    def attend(rows, start):
        return decode_attention(rows.contiguous(), k, v, start, None, None, True, False, amx)

    singles = torch.cat([attend(q[:, i : i + 1], 1000 + i) for i in range(16)], dim=1)
    for n in (2, 5, 9, 16):
        assert torch.equal(attend(q[:, :n], 1000), singles[:, :n]), n
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(attend(q, 1000), singles)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity, n, head_dim", [("kv", 5, 64), ("kv", 1, 128), ("query", 3, 64), ("kv", 16, 40)])
def test_candidate_mass_is_the_references(decode_attention, dtype, granularity, n, head_dim):
    """Two-stage selection's masses, the kernel's and PyTorch ops', against mask.candidate_attention
    in float64, over 150 nominees (so several chunks and a ragged last one) of a 400-token context."""
    from sts_edge.mask import candidate_attention

    heads, kv_heads, start = 8, 2, 400
    q, k, _ = random_case(heads, kv_heads, head_dim, n, start, dtype, seed=n + head_dim)
    units = kv_heads if granularity == "kv" else heads
    nominated = random_sets(units, start, 150, seed=n)
    from sts_edge.backends.torch.selection import candidate_mass  # the PyTorch-ops path, used off the CPU kernel

    want = candidate_attention(q.double().numpy(), k.double().numpy(), start, nominated.numpy(), granularity)
    want = np.take_along_axis(want, nominated.numpy(), axis=-1)
    for got in (torch.ops.sts_edge_cpu.candidate_mass(q, k, start, nominated), candidate_mass(q, k, start, nominated)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)


def test_bad_arguments_are_refused(decode_attention):
    q, k, v = random_case(4, 2, 64, 3, 50, torch.float32, seed=8)
    with pytest.raises(RuntimeError, match="1 to 16 rows"):
        decode_attention(torch.randn(4, 17, 64), k, v, 10)
    with pytest.raises(RuntimeError, match="does not fit"):
        decode_attention(q, k, v, k.shape[1] - 2)
    with pytest.raises(RuntimeError, match="one dtype"):
        decode_attention(q.double(), k, v, 50)
    with pytest.raises(RuntimeError, match=r"\[0, start\)"):
        decode_attention(q, k, v, 50, torch.tensor([[0, 50], [1, 2]]))
    with pytest.raises(RuntimeError, match="per KV head or per query head"):
        decode_attention(q, k, v, 50, torch.tensor([[0, 1], [1, 2], [2, 3]]))
    with pytest.raises(RuntimeError, match="one row per KV head"):
        decode_attention(q, k, v, 50, None, torch.zeros(3, k.shape[1]))
    candidate_mass = torch.ops.sts_edge_cpu.candidate_mass
    with pytest.raises(RuntimeError, match=r"\[0, start\)"):
        candidate_mass(q, k, 50, torch.tensor([[0, 50], [1, 2]]))
    with pytest.raises(RuntimeError, match="per KV head or per query head"):
        candidate_mass(q, k, 50, torch.tensor([[0, 1], [1, 2], [2, 3]]))
    with pytest.raises(RuntimeError, match="one dtype"):
        candidate_mass(q.double(), k, 50, torch.tensor([[0, 1], [1, 2]]))


def test_the_attention_kernel_can_be_turned_off(monkeypatch):
    from sts_edge.cpu_kernels import extension

    monkeypatch.setenv("STS_EDGE_CPU_ATTENTION", "0")
    extension.attention_kernel.cache_clear()
    try:
        assert extension.attention_kernel() is None
    finally:
        monkeypatch.delenv("STS_EDGE_CPU_ATTENTION")
        extension.attention_kernel.cache_clear()
