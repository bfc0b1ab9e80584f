"""The draft's quantized KV cache (8 and 4 bits, group-wise affine along head_dim) on both backends:
its rows against a numpy reference of the rule, and the oracle that a draft's precision never
changes the output."""

import numpy as np
import pytest

from sts_edge.backend import load_model
from sts_edge.sampling import SamplingParams
from sts_edge.speculative import GenerationStats, generate_tokens

GREEDY = SamplingParams()


def reference_rows(x: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(decoded rows, each value's level, each value's largest allowed error) by the rule: each
    group's [min, max] onto 0..2^bits - 1 in steps of (max - min) / (2^bits - 1), rounded to the
    nearest step."""
    groups = x.astype(np.float64).reshape(*x.shape[:-1], -1, group_size)
    low, high = groups.min(-1, keepdims=True), groups.max(-1, keepdims=True)
    step = (high - low) / ((1 << bits) - 1)
    levels = np.clip(np.rint((groups - low) / np.where(step > 0, step, 1)), 0, (1 << bits) - 1)
    decoded = levels * step + low
    bound = np.broadcast_to(step / 2, groups.shape)
    return decoded.reshape(x.shape), levels.reshape(x.shape).astype(np.uint8), bound.reshape(x.shape)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [16, 32])
def test_torch_rows_round_trip_within_half_a_step(bits, group_size):
    import torch

    from sts_edge.backends.torch.quantized_kv import QuantizedKVCache, dequantize_rows, quantize_rows

    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 7, 64, generator=gen) * torch.linspace(0.1, 4, 64)
    x[1, 3] = 0.5  # a constant row: zero range, decoded exactly
    want, levels, bound = reference_rows(x.numpy(), bits, group_size)
    values, scales, biases = quantize_rows(x, bits, group_size)
    assert values.dtype == torch.uint8 and values.shape == (2, 7, 64 * bits // 8)
    got = dequantize_rows(values, scales, biases, bits, group_size).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert (np.abs(got - x.numpy()) <= bound + 1e-5).all()
    assert (got[1, 3] == 0.5).all()
    # 4 bits: two to a byte, the even position in the low nibble (mlx-lm's words, byte by byte).
    stored = np.stack((values.numpy() & 15, values.numpy() >> 4), -1).reshape(levels.shape) if bits == 4 else values.numpy()
    assert (np.abs(stored.astype(int) - levels) <= 1).all()  # a value exactly between two steps may go either way
    assert (stored == levels).mean() > 0.99

    cache = QuantizedKVCache(2, 16, 64, bits, torch.float32, torch.device("cpu"), group_size)
    cache.write(3, x, x * 2)
    cache.write(torch.tensor([10], dtype=torch.int32), x[:, :2], x[:, :2])  # a device-side start (CUDA graphs)
    keys, values_rows = cache.rows(12)
    np.testing.assert_allclose(keys[:, 3:10].numpy(), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(values_rows[:, 3:10].numpy(), reference_rows(2 * x.numpy(), bits, group_size)[0],
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(keys[:, 10:12].numpy(), want[:, :2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_mlx_rows_follow_the_same_rule(bits):
    mx = pytest.importorskip("mlx.core")
    from sts_edge.backends.mlx.model import QuantizedKVCache

    x = np.random.default_rng(bits).standard_normal((1, 2, 5, 64)).astype(np.float32)
    cache = QuantizedKVCache(2, 8, 64, bits, mx.float32, 32)
    cache.write(2, mx.array(x), mx.array(-x))
    keys, values = cache.rows(7)
    np.testing.assert_allclose(np.array(keys)[:, :, 2:7], reference_rows(x, bits, 32)[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.array(values)[:, :, 2:7], reference_rows(-x, bits, 32)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch-cpu", "mlx"])
@pytest.mark.parametrize("kv_bits", [8, 4])
def test_a_quantized_draft_cache_never_changes_the_greedy_output(backend, kv_bits, model_dirs, draft_dir):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    from sts_edge.mask import MaskPolicy

    target = load_model(model_dirs["llama3"], backend, max_seq_len=128)
    prompt = np.random.default_rng(5).integers(3, 300, 40).tolist()
    alone = list(generate_tokens(target, prompt, GREEDY, 16))
    # The target drafting for itself with a quantized cache: high acceptance, yet not perfect. STS
    # with a budget that covers the context: the draft's scores are collected, the output is dense's
    # (a smaller budget makes the sets, hence the output, depend on the draft by design).
    for draft_path in (draft_dir, model_dirs["llama3"]):
        draft = load_model(draft_path, backend, max_seq_len=128, kv_bits=kv_bits)
        assert f"int{kv_bits} KV" in draft.precision
        for gamma, policy in ((1, None), (3, None), (3, MaskPolicy("sts", budget=64, sink=2, window=4))):
            stats = GenerationStats()
            got = list(generate_tokens(target, prompt, GREEDY, 16, draft=draft, gamma=gamma, stats=stats, policy=policy))
            assert got == alone, (draft_path.name, gamma, policy)
            if draft_path == model_dirs["llama3"]:
                assert stats.acceptance_rate > 0.5


def test_bad_kv_bits_are_refused_before_loading(model_dirs, draft_dir):
    from sts_edge import api

    with pytest.raises(ValueError, match="kv_bits must be one of 16, 8, 4"):
        load_model(model_dirs["llama3"], "torch-cpu", max_seq_len=32, kv_bits=2)
    with pytest.raises(ValueError, match="draft_kv_bits must be one of 16, 8, 4"):
        api.load(model_dirs["llama3"], draft_dir, backend="torch-cpu", max_seq_len=32, draft_kv_bits=5)
    engine = api.load(model_dirs["llama3"], draft_dir, backend="torch-cpu", max_seq_len=64, draft_kv_bits=4)
    assert "KV" not in engine.target.precision and "int4 KV" in engine.draft.precision
    stats = GenerationStats()
    engine.generate(list(range(3, 20)), max_tokens=4, stats=stats)
    assert "draft" in stats.precision and "int4 KV" in stats.precision


def test_the_cli_offers_the_draft_cache_precision():
    from sts_edge.chat import build_parser

    args = build_parser().parse_args(["--draft-kv-bits", "8"])
    assert args.draft_kv_bits == 8
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--draft-kv-bits", "3"])
