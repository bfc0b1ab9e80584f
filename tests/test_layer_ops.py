"""The fused per-token kernels (triton_kernels/layer_ops.py) against float64 references written
from the definitions (on the CPU through TRITON_INTERPRET=1), and the model's GPU path built on
them against its plain path."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

from sts_edge.triton_kernels.layer_ops import rms_norm, rope_and_cache, silu_mul  # noqa: E402
from sts_edge.triton_kernels.verify_attention import KernelInputError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16]
# A few units in the last place: the kernels round where PyTorch does, but sum in another order
# (and the interpreter truncates to bfloat16 where a GPU rounds).
ULPS = {torch.float16: 4 * 2.0**-10, torch.bfloat16: 4 * 2.0**-7}


def randn(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def assert_close(got, want, dtype):
    got = got.double().cpu()
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, rtol=ULPS[dtype], atol=ULPS[dtype])


def rms_reference(x, weight, eps):
    x, weight = x.double().cpu(), weight.double().cpu()
    return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, dim", [(1, 64), (3, 576), (5, 4096)])
def test_rms_norm_matches_reference(rows, dim, dtype):
    x, weight = randn(rows, dim, dtype=dtype, seed=dim), randn(dim, dtype=dtype, seed=1)
    assert_close(rms_norm(x, weight, 1e-5), rms_reference(x, weight, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_adds_the_residual_first(dtype):
    x, residual, weight = (randn(4, 576, dtype=dtype, seed=s) for s in (1, 2, 3))
    weight = weight[0]
    normed, summed = rms_norm(x, weight, 1e-6, residual)
    # The sum is stored in the model dtype (as x + residual is in PyTorch), then normalised.
    exact_sum = (x.double() + residual.double()).cpu()
    assert_close(summed, exact_sum, dtype)
    assert_close(normed, rms_reference(summed, weight, 1e-6), dtype)
    assert summed.dtype == normed.dtype == dtype


def rotary_tables(capacity, head_dim, dtype):
    angles = torch.arange(capacity, dtype=torch.float64)[:, None] * 0.7 ** torch.arange(head_dim // 2)
    return angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE)


def rotate_reference(x, cos, sin):
    """Rotate-half RoPE of x [..., n, head_dim] by cos/sin [n, head_dim // 2], in float64."""
    x1, x2 = x.double().cpu().chunk(2, -1)
    cos, sin = cos.double().cpu(), sin.double().cpu()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, n, qk_norm, device_start",
    [(4, 4, 64, 1, False, False), (8, 2, 128, 5, False, True), (8, 1, 64, 9, True, False), (4, 2, 32, 3, True, True)],
)
def test_rope_and_cache_matches_reference(heads, kv_heads, head_dim, n, qk_norm, device_start, dtype):
    start, capacity = 20, 40
    qkv = randn(n, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=n)
    cos, sin = rotary_tables(capacity, head_dim, dtype)
    sentinel = 7.0  # rows outside the block must keep it
    cache_k = torch.full((kv_heads, capacity, head_dim), sentinel, dtype=dtype, device=DEVICE)
    cache_v = cache_k.clone()
    norms = dict(q_norm=randn(head_dim, dtype=dtype, seed=5), k_norm=randn(head_dim, dtype=dtype, seed=6), eps=1e-6) \
        if qk_norm else {}
    at = torch.tensor([start], dtype=torch.int32, device=DEVICE) if device_start else start
    q = rope_and_cache(qkv, cos, sin, cache_k, cache_v, at, heads, **norms)

    split = qkv.double().cpu().view(n, heads + 2 * kv_heads, head_dim).transpose(0, 1)
    want_q, want_k, want_v = split[:heads], split[heads : heads + kv_heads], split[heads + kv_heads :]
    if qk_norm:  # normalised per head, rounded to the model dtype as the plain path stores it
        want_q = rms_reference(want_q, norms["q_norm"], 1e-6).to(dtype).double()
        want_k = rms_reference(want_k, norms["k_norm"], 1e-6).to(dtype).double()
    positions = slice(start, start + n)
    assert q.shape == (heads, n, head_dim) and q.dtype == dtype
    assert_close(q, rotate_reference(want_q, cos[positions], sin[positions]), dtype)
    assert_close(cache_k[:, positions], rotate_reference(want_k, cos[positions], sin[positions]), dtype)
    assert torch.equal(cache_v[:, positions].double().cpu(), want_v)
    for cache in (cache_k, cache_v):
        assert (cache[:, :start] == sentinel).all() and (cache[:, start + n :] == sentinel).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("head_dim, group_size, device_start", [(64, 64, False), (128, 64, True)])
def test_rope_and_cache_quantizes_into_a_drafts_cache(bits, head_dim, group_size, device_start):
    """Into a quantized cache (a draft's), the rows written are quantize_rows of the rotated k and
    of v less the cache's centres (the numpy rule in backends/torch/quantized_kv.py), rows outside
    the block untouched; q as into a 16-bit cache."""
    from sts_edge.backends.torch.quantized_kv import QuantizedKVCache, quantize_rows

    heads, kv_heads, n, start, capacity, dtype = 4, 2, 3, 20, 40, torch.bfloat16
    qkv = randn(n, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=bits) * 3
    cos, sin = rotary_tables(capacity, head_dim, dtype)
    cache = QuantizedKVCache(kv_heads, capacity, head_dim, bits, dtype, torch.device(DEVICE), group_size)
    for name in ("k", "v"):
        getattr(cache, f"{name}_centres").copy_(randn(kv_heads, head_dim, dtype=torch.float32, seed=9))
        getattr(cache, f"{name}_values").fill_(77)
    plain_k = torch.zeros(kv_heads, capacity, head_dim, dtype=dtype, device=DEVICE)
    plain_v = plain_k.clone()
    at = torch.tensor([start], dtype=torch.int32, device=DEVICE) if device_start else start
    want_q = rope_and_cache(qkv, cos, sin, plain_k, plain_v, at, heads)
    q = rope_and_cache(qkv, cos, sin, *cache.kernel_rows(), at, heads)
    assert torch.equal(q, want_q)
    rows = slice(start, start + n)
    for name, plain in (("k", plain_k), ("v", plain_v)):
        centres = getattr(cache, f"{name}_centres")
        values, scales, biases = quantize_rows(plain[:, rows], bits, group_size, centres[:, None])
        got = getattr(cache, f"{name}_values")[:, rows]
        if bits == 4:  # compare nibbles: a rounding tie may land one step apart
            got, values = (torch.stack((t & 15, t >> 4), -1) for t in (got, values))
        assert (got.int() - values.int()).abs().max() <= 1 and (got != values).float().mean() < 0.02
        torch.testing.assert_close(getattr(cache, f"{name}_scales")[:, rows], scales, rtol=1e-6, atol=0)
        torch.testing.assert_close(getattr(cache, f"{name}_biases")[:, rows], biases, rtol=1e-6, atol=0)
        assert (getattr(cache, f"{name}_values")[:, :start] == 77).all()
        assert (getattr(cache, f"{name}_values")[:, start + n :] == 77).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, inter", [(1, 64), (3, 1500)])
def test_silu_mul_matches_reference(rows, inter, dtype):
    gate_up = randn(rows, 2 * inter, dtype=dtype, seed=inter) * 3
    gate, up = gate_up.double().cpu().chunk(2, -1)
    assert_close(silu_mul(gate_up), gate / (1 + torch.exp(-gate)) * up, dtype)


def test_invalid_inputs_raise_clear_errors():
    x = randn(2, 64, dtype=torch.float16, seed=0)
    with pytest.raises(KernelInputError, match="bfloat16 or float16"):
        rms_norm(x.float(), x[0].float(), 1e-5)
    with pytest.raises(KernelInputError, match="weight must be"):
        rms_norm(x, x[0, :32], 1e-5)
    with pytest.raises(KernelInputError, match="residual must match"):
        rms_norm(x, x[0], 1e-5, x[:1])
    with pytest.raises(KernelInputError, match="even width"):
        silu_mul(x[:, :63])
    cos, sin = rotary_tables(8, 16, torch.float16)
    cache = torch.zeros(1, 8, 16, dtype=torch.float16, device=DEVICE)
    qkv = randn(2, 4 * 16, dtype=torch.float16, seed=1)
    with pytest.raises(KernelInputError, match="80 features for 3 heads"):
        rope_and_cache(qkv, cos, sin, cache, cache.clone(), 0, 3)
    with pytest.raises(KernelInputError, match="do not fit the cache"):
        rope_and_cache(qkv, cos, sin, cache, cache.clone(), 7, 2)
    with pytest.raises(KernelInputError, match="rotary tables must be"):
        rope_and_cache(qkv, cos[:, :4], sin[:, :4], cache, cache.clone(), 0, 2)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors through the interpreter; on a GPU "
                    "test_model_on_gpu_gives_the_plain_paths_logits covers the kernel path")
@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_kernel_path_matches_plain_path_for_biases_and_qk_norm(make_model, kind):
    """The model's kernel path (fused projections with Qwen2's q/k/v biases, Qwen3's per-head
    norms inside rope_and_cache) against its plain path, at a device-side position."""
    from sts_edge import load

    model_dir = make_model(kind, head_dim=64, num_hidden_layers=2)
    target = load(model_dir, backend="torch-cpu", max_seq_len=64, dtype="float16").target
    target.prefill(list(range(3, 40)))
    ids = torch.tensor([5, 6, 7])
    with torch.inference_mode():
        want = target.model(ids, 37, True)
        got = target.model(ids, torch.tensor([37], dtype=torch.int32), True, bound=48)
    np.testing.assert_allclose(got.float().numpy(), want.float().numpy(), rtol=2e-2, atol=2e-2)
