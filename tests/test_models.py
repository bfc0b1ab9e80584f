"""Logits of both backends against the reference implementations on the same directories."""

import numpy as np
import pytest
import torch

from sts_edge.backend import load_model

BACKENDS = ["torch-cpu", "mlx"]
ARCHS = ["llama3", "qwen2", "qwen3", "mistral", "smollm2"]


def reference_logits(hf, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().numpy()


def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_cached_decode_match_transformers(arch, backend, model_dirs, hf_model):
    """Prefill of 40 tokens, then 20 one-token steps against the cache, position for position.

    60 positions pass the llama3 fixture's original context of 64 only barely, so the test also
    runs a longer sequence below where the rope scaling matters most.
    """
    hf = hf_model(model_dirs[arch])
    ids = prompt_ids(hf.config.vocab_size, 60)
    expected = reference_logits(hf, ids)
    model = load_model(model_dirs[arch], backend, max_seq_len=128)
    got = [model.verify(ids[:40]).logits()] + [model.prefill([t]).logits() for t in ids[40:]]
    np.testing.assert_allclose(np.concatenate(got), expected, atol=2e-4, rtol=1e-4)
    assert model.length == 60


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama3_rope_scaling_at_long_positions(backend, model_dirs, hf_model):
    hf = hf_model(model_dirs["llama3"])
    ids = prompt_ids(hf.config.vocab_size, 300, seed=1)
    expected = reference_logits(hf, ids)
    model = load_model(model_dirs["llama3"], backend, max_seq_len=512)
    got = [model.verify(ids[:290]).logits()] + [model.verify(ids[290:295]).logits()]
    got += [model.prefill([t]).logits() for t in ids[295:]]
    np.testing.assert_allclose(np.concatenate(got), expected, atol=3e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_last_only_logits_equal_the_last_row(backend, model_dirs):
    model = load_model(model_dirs["qwen2"], backend, max_seq_len=64)
    ids = prompt_ids(model.config.vocab_size, 12)
    all_rows = model.verify(ids).logits()
    model.rollback(0)
    last = model.prefill(ids).logits()
    assert last.shape == (1, model.config.vocab_size)
    np.testing.assert_allclose(last[0], all_rows[-1], atol=1e-5)


@pytest.mark.parametrize("arch", ["llama3", "qwen2", "qwen3"])
def test_mlx_matches_mlx_lm(arch, model_dirs):
    """mlx-lm's own model class, loaded from the same directory, is the MLX reference."""
    import mlx.core as mx
    from mlx_lm.utils import load_model as mlx_lm_load

    reference, _ = mlx_lm_load(model_dirs[arch])
    ids = prompt_ids(336, 30, seed=2)
    expected = np.array(reference(mx.array([ids]))[0].astype(mx.float32))
    model = load_model(model_dirs[arch], "mlx", max_seq_len=64)
    got = np.concatenate([model.verify(ids[:20]).logits()] + [model.prefill([t]).logits() for t in ids[20:]])
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_stays_close_to_float32(backend, model_dirs, hf_model):
    hf = hf_model(model_dirs["llama3"])
    ids = prompt_ids(hf.config.vocab_size, 24)
    expected = reference_logits(hf, ids)
    model = load_model(model_dirs["llama3"], backend, max_seq_len=64, dtype="bfloat16")
    got = np.concatenate([model.verify(ids[:16]).logits()] + [model.prefill([t]).logits() for t in ids[16:]])
    # bfloat16 keeps 8 bits of mantissa; logits here have a spread of about 1.
    np.testing.assert_allclose(got, expected, atol=0.15)
