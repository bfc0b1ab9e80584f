"""cpu_kernels/affine_matmul.cpp against mlx-lm's rule decoded in numpy (W = scale * q + bias)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def affine_matmul():
    from sts_edge.cpu_kernels.extension import kernel, unavailable_reason

    if kernel() is None:
        pytest.skip(f"the CPU kernel is unavailable here: {unavailable_reason()}")
    return kernel()


def random_weight(outputs: int, inputs: int, bits: int, group_size: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(-2**31, 2**31 - 1, (outputs, inputs * bits // 32), dtype=torch.int32, generator=gen)
    scales = (torch.rand(outputs, inputs // group_size, generator=gen) * 0.1).to(dtype)
    biases = (torch.randn(outputs, inputs // group_size, generator=gen) * 0.1).to(dtype)
    return words, scales, biases


def decoded(words: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int) -> np.ndarray:
    """W in float64, value by value as mlx-lm packs them: least significant bits first."""
    as_bytes = words.numpy().view(np.uint32)
    per_word = 32 // bits
    values = np.stack([(as_bytes >> (bits * k)) & ((1 << bits) - 1) for k in range(per_word)], axis=-1)
    outputs = words.shape[0]
    q = values.reshape(outputs, -1, group_size).astype(np.float64)
    s = scales.float().numpy().astype(np.float64)[..., None]
    b = biases.float().numpy().astype(np.float64)[..., None]
    return (q * s + b).reshape(outputs, -1)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_products_equal_the_decoded_weights(affine_matmul, bits, group_size, dtype):
    words, scales, biases = random_weight(72, 384, bits, group_size, getattr(torch, dtype), seed=bits + group_size)
    w = decoded(words, scales, biases, bits, group_size)
    gen = torch.Generator().manual_seed(1)
    for rows in (1, 2, 3, 4, 5, 7, 8, 9, 40):  # decode passes of 1-4 rows, two passes, decoded tiles
        x = torch.randn(rows, 384, generator=gen)
        want = x.double().numpy() @ w.T
        got = affine_matmul(x, words, scales, biases, bits, group_size).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=f"{rows} rows")


def bfloat16_rounded(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).bfloat16().double().numpy()


@pytest.mark.parametrize("bits", [4, 8])
def test_prefill_sized_products_in_bfloat16_tiles(affine_matmul, bits):
    """`bfloat16_tiles` (what bfloat16 activations ask for): a prefill chunk's decoded weights and
    its activations rounded to bfloat16, the sums in float32 and the result in bfloat16 (which the
    caller rounds to anyway), so it is the rounded operands' product, rounded; blocks of up to 8
    rows ignore it (the decode loops read the packed words)."""
    words, scales, biases = random_weight(300, 384, bits, 64, torch.bfloat16, seed=9)
    w = decoded(words, scales, biases, bits, 64)
    x = torch.randn(20, 384, generator=torch.Generator().manual_seed(3))
    got = affine_matmul(x, words, scales, biases, bits, 64, False, False, True).numpy()
    assert np.array_equal(bfloat16_rounded(got), got)
    want = bfloat16_rounded(bfloat16_rounded(x.numpy()) @ bfloat16_rounded(w).T)
    np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-3 * np.abs(want).max())  # a float32 sum may round the other way
    agree = np.mean(got == want)
    assert agree > 0.9
    assert np.mean(got == bfloat16_rounded(x.double().numpy() @ w.T)) < agree - 0.1  # the operands were rounded
    few = x[:8]
    np.testing.assert_array_equal(affine_matmul(few, words, scales, biases, bits, 64, False, False, True).numpy(),
                                  affine_matmul(few, words, scales, biases, bits, 64).numpy())


def int8_rounded(x: np.ndarray, group_size: int) -> np.ndarray:
    """x as the integer products see it: each group rounded to int8 steps of max |x| / 127, the
    step's inverse and the quotient in float32 as the kernel computes them (in float64 a value
    within an ulp of a half step can round the other way)."""
    groups = x.reshape(x.shape[0], -1, group_size).astype(np.float32)
    largest = np.abs(groups).max(-1, keepdims=True)
    inverse = np.where(largest > 0, np.float32(127) / np.where(largest > 0, largest, 1), np.float32(0))
    step = (largest / np.float32(127)).astype(np.float64)
    return (np.rint(groups * inverse).astype(np.float64) * step).reshape(x.shape)


def needs_amx(amx: bool) -> None:
    from sts_edge.cpu_kernels.extension import amx_ready

    if amx and not amx_ready():
        pytest.skip("this CPU has no AMX (or STS_EDGE_CPU_AMX=0)")


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("amx", [False, True], ids=["avx2", "amx"])
def test_int8_activation_products_equal_the_rounded_activations_times_the_weights(affine_matmul, group_size, amx):
    """4-bit weights with activations rounded to int8 per group: exact integer products, so the
    result is the rounded activations times the decoded weights (and near the float products).
    `amx`: on AMX tiles (groups of 64 and 128; one row through AVX-512 VNNI, more through tiles of 16
    rows, 72 outputs: four whole tiles and half of one), else the AVX2 loop (up to 8 rows)."""
    needs_amx(amx)
    if amx and group_size == 32:
        pytest.skip("groups of 32 stay on the AVX2 loop")
    words, scales, biases = random_weight(72, 384, 4, group_size, torch.bfloat16, seed=group_size)
    w = decoded(words, scales, biases, 4, group_size)
    gen = torch.Generator().manual_seed(7)
    for rows in (1, 2, 3, 5, 8, 16, 17, 40) if amx else (1, 3, 5, 8):
        x = torch.randn(rows, 384, generator=gen)
        got = affine_matmul(x, words, scales, biases, 4, group_size, True, amx).numpy()
        # The biases multiply the exact sums of x; the scales the rounded activations' products.
        q = decoded(words, scales, torch.zeros_like(biases), 4, group_size)
        b = w - q
        want = int8_rounded(x.numpy(), group_size) @ q.T + x.double().numpy() @ b.T
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=f"{rows} rows")
        exact = x.double().numpy() @ w.T
        assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.02
        alone = np.concatenate([affine_matmul(x[i : i + 1], words, scales, biases, 4, group_size, True, amx).numpy()
                                for i in range(rows)])
        np.testing.assert_array_equal(got, alone)  # a row's bits do not depend on its block


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_amx_products_read_every_scale_dtype_and_outputs_past_the_last_whole_tile(affine_matmul, dtype):
    needs_amx(True)
    words, scales, biases = random_weight(37, 256, 4, 64, getattr(torch, dtype), seed=11)
    q = decoded(words, scales, torch.zeros_like(biases), 4, 64)
    b = decoded(words, scales, biases, 4, 64) - q
    for rows in (1, 4):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
        want = int8_rounded(x.numpy(), 64) @ q.T + x.double().numpy() @ b.T
        got = affine_matmul(x, words, scales, biases, 4, 64, True, True).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=f"{rows} rows")


def test_tiles_cover_outputs_that_are_not_a_whole_number_of_tiles(affine_matmul):
    words, scales, biases = random_weight(600, 256, 4, 64, torch.bfloat16, seed=3)
    x = torch.randn(12, 256, generator=torch.Generator().manual_seed(2))
    want = x.double().numpy() @ decoded(words, scales, biases, 4, 64).T
    np.testing.assert_allclose(affine_matmul(x, words, scales, biases, 4, 64).numpy(), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())


def test_a_row_gets_the_same_bits_in_any_block_of_up_to_eight(affine_matmul):
    words, scales, biases = random_weight(40, 256, 4, 32, torch.bfloat16, seed=5)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(6))
    alone = torch.cat([affine_matmul(x[i : i + 1], words, scales, biases, 4, 32) for i in range(8)])
    for rows in range(2, 9):
        assert torch.equal(affine_matmul(x[:rows], words, scales, biases, 4, 32), alone[:rows]), rows


def test_bad_arguments_are_refused(affine_matmul):
    words, scales, biases = random_weight(16, 256, 4, 64, torch.bfloat16, seed=0)
    x = torch.randn(2, 256)
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        affine_matmul(x, words, scales, biases, 3, 64)
    with pytest.raises(RuntimeError, match="group_size"):
        affine_matmul(x, words, scales, biases, 4, 48)
    with pytest.raises(RuntimeError, match="inputs"):
        affine_matmul(torch.randn(2, 128), words, scales, biases, 4, 64)
    with pytest.raises(RuntimeError, match="float32"):
        affine_matmul(x.double(), words, scales, biases, 4, 64)
    with pytest.raises(RuntimeError, match="scales"):
        affine_matmul(x, words, scales[:, :2], biases[:, :2], 4, 64)
    words8, scales8, biases8 = random_weight(16, 256, 8, 64, torch.bfloat16, seed=0)
    with pytest.raises(RuntimeError, match="int8 activations are for 4-bit"):
        affine_matmul(x, words8, scales8, biases8, 8, 64, True)


def test_the_kernel_can_be_turned_off(monkeypatch):
    from sts_edge.cpu_kernels import extension as module

    monkeypatch.setenv("STS_EDGE_CPU_KERNELS", "0")
    module.kernel.cache_clear()
    try:
        assert module.kernel() is None and module.unavailable_reason() == "STS_EDGE_CPU_KERNELS=0"
    finally:
        monkeypatch.delenv("STS_EDGE_CPU_KERNELS")
        module.kernel.cache_clear()


def test_embedding_rows_are_decoded_in_float32_from_bfloat16_scales():
    """Looked-up rows of a packed table are the weights the products see: decoded in float32 and
    rounded once to the model's dtype, not rounded to the scales' bfloat16 on the way."""
    from sts_edge.backends.torch.quantized import CpuAffineWeight

    words, scales, biases = random_weight(50, 128, 4, 64, torch.bfloat16, seed=9)
    table = CpuAffineWeight(words, scales, biases, 4, 64)
    ids = torch.tensor([3, 0, 49, 3])
    want = decoded(words, scales, biases, 4, 64)[ids.numpy()]
    np.testing.assert_allclose(table.rows(ids, torch.float32).numpy(), want, rtol=1e-6, atol=1e-7)
    assert table.rows(ids, torch.bfloat16).dtype == torch.bfloat16
