"""The draft's quantized KV cache (8 and 4 bits, group-wise affine along head_dim around a fixed
per-channel centre) on both backends: its rows against a numpy reference of the rule, and the
oracle that a draft's precision never changes the output."""

import numpy as np
import pytest

from sts_edge.backend import load_model
from sts_edge.sampling import SamplingParams
from sts_edge.speculative import GenerationStats, generate_tokens

GREEDY = SamplingParams()


def reference_rows(x: np.ndarray, bits: int, group_size: int, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(decoded rows, each value's level, each value's largest allowed error) by the rule: x minus
    its channel's centre, then each group's [min, max] onto 0..2^bits - 1 in steps of (max - min) /
    (2^bits - 1), rounded to the nearest step; decoded as level * step + min + centre."""
    centred = x.astype(np.float64) - centres
    groups = centred.reshape(*x.shape[:-1], -1, group_size)
    low, high = groups.min(-1, keepdims=True), groups.max(-1, keepdims=True)
    step = (high - low) / ((1 << bits) - 1)
    levels = np.clip(np.rint((groups - low) / np.where(step > 0, step, 1)), 0, (1 << bits) - 1)
    decoded = (levels * step + low).reshape(x.shape) + centres
    bound = np.broadcast_to(step / 2, groups.shape)
    return decoded, levels.reshape(x.shape).astype(np.uint8), bound.reshape(x.shape)


def assert_decodes_like(got: np.ndarray, want: np.ndarray, bound: np.ndarray, rtol: float = 1e-5) -> None:
    """got equals the reference's decoding but where a value lay exactly between two levels
    (float32 against float64 arithmetic may then round it the other way: one step off). The float32
    sums of a group near -145 are off by its ulps: 1e-4."""
    close = np.abs(got - want) <= 1e-4 + rtol * np.abs(want)
    assert (close | (np.abs(got - want) <= 2 * bound * (1 + 1e-4) + 1e-4 + rtol * np.abs(want))).all()
    assert close.mean() > 0.99


def keys_with_outliers(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Rows like Qwen2's keys: small channels, and a few that sit near -145 or +130 in every row."""
    x = rng.standard_normal(shape) * np.linspace(0.1, 4, shape[-1])
    x[..., [5, 30, 62]] += [-145.0, 130.0, 70.0]
    return x.astype(np.float32)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [16, 32])
def test_torch_rows_round_trip_within_half_a_step(bits, group_size):
    import torch

    from sts_edge.backends.torch.quantized_kv import QuantizedKVCache, dequantize_rows, quantize_rows

    x = torch.from_numpy(keys_with_outliers(np.random.default_rng(bits), (2, 7, 64)))
    rows = x.clone()
    rows[1, 3] = 0.5  # a constant row: zero range, decoded exactly (no centre)
    zero = np.zeros((2, 1, 64), np.float32)
    want, levels, bound = reference_rows(rows.numpy(), bits, group_size, zero)
    values, scales, biases = quantize_rows(rows, bits, group_size)
    assert values.dtype == torch.uint8 and values.shape == (2, 7, 64 * bits // 8)
    assert scales.dtype == biases.dtype == torch.float32 and scales.shape == (2, 7, 64 // group_size)
    got = dequantize_rows(values, scales, biases, bits, group_size).numpy()
    assert_decodes_like(got, want, bound)
    assert (np.abs(got - rows.numpy()) <= bound + 1e-4).all()
    assert (got[1, 3] == 0.5).all()
    # 4 bits: two to a byte, the even position in the low nibble (mlx-lm's words, byte by byte).
    stored = np.stack((values.numpy() & 15, values.numpy() >> 4), -1).reshape(levels.shape) if bits == 4 else values.numpy()
    assert (np.abs(stored.astype(int) - levels) <= 1).all()  # a value exactly between two steps may go either way
    assert (stored == levels).mean() > 0.99

    # The cache: the write at row 0 sets each channel's centre (per KV head, the mean of its rows);
    # later writes, host- or device-started (CUDA graphs), keep it.
    cache = QuantizedKVCache(2, 16, 64, bits, torch.float32, torch.device("cpu"), group_size)
    cache.write(0, x, x * 2)
    later = torch.from_numpy(keys_with_outliers(np.random.default_rng(9), (2, 4, 64)))
    cache.write(torch.tensor([7], dtype=torch.int32), later[:, :2], later[:, :2])
    cache.write(9, later[:, 2:], -later[:, 2:])
    centres = x.numpy().astype(np.float64).mean(1, keepdims=True)
    np.testing.assert_allclose(cache.k_centres.numpy(), centres[:, 0], rtol=1e-6, atol=1e-5)
    want_k, _, bound_k = reference_rows(np.concatenate([x.numpy(), later.numpy()], 1), bits, group_size, centres)
    want_v, _, bound_v = reference_rows(np.concatenate([2 * x.numpy(), later[:, :2].numpy(), -later[:, 2:].numpy()], 1),
                                        bits, group_size, 2 * centres)
    keys, values_rows = cache.rows(11)
    assert_decodes_like(keys.numpy(), want_k, bound_k)
    assert_decodes_like(values_rows.numpy(), want_v, bound_v)
    assert (np.abs(keys.numpy() - np.concatenate([x.numpy(), later.numpy()], 1)) <= bound_k + 1e-4).all()
    # What the centres are for: the outlier channels no longer set the step of the small ones.
    uncentred_step = 2 * reference_rows(x.numpy(), bits, group_size, zero)[2]
    assert np.median(bound_k[:, :7] * 2) < np.median(uncentred_step) / 8

    # In the model's dtype the float32 decode is rounded once; scales and biases stay float32.
    cache = QuantizedKVCache(2, 16, 64, bits, torch.bfloat16, torch.device("cpu"), group_size)
    cache.write(0, x.to(torch.bfloat16), x.to(torch.bfloat16))
    assert cache.k_scales.dtype == torch.float32
    keys, _ = cache.rows(7)
    assert keys.dtype == torch.bfloat16
    bf16_x = x.to(torch.bfloat16).float().numpy()
    want, _, bound = reference_rows(bf16_x, bits, group_size, bf16_x.astype(np.float64).mean(1, keepdims=True))
    assert_decodes_like(keys.float().numpy(), want, bound, rtol=2**-8)  # within bfloat16's rounding


@pytest.mark.parametrize("bits", [8, 4])
def test_mlx_rows_follow_the_same_rule(bits):
    mx = pytest.importorskip("mlx.core")
    from sts_edge.backends.mlx.model import QuantizedKVCache

    rng = np.random.default_rng(bits)
    x = keys_with_outliers(rng, (1, 2, 5, 64))
    later = keys_with_outliers(rng, (1, 2, 2, 64))
    cache = QuantizedKVCache(2, 8, 64, bits, mx.float32, 32)
    cache.write(0, mx.array(x), mx.array(-x))
    cache.write(5, mx.array(later), mx.array(later))
    keys, values = cache.rows(7)
    centres = x.astype(np.float64).mean(2, keepdims=True)
    want_k, _, bound_k = reference_rows(np.concatenate([x, later], 2), bits, 32, centres)
    want_v, _, bound_v = reference_rows(np.concatenate([-x, later], 2), bits, 32, -centres)
    assert_decodes_like(np.array(keys), want_k, bound_k)
    assert_decodes_like(np.array(values), want_v, bound_v)


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
