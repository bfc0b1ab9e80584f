"""The weight-only quantized matrix product against decode-then-multiply in float64 (TRITON_INTERPRET=1 on CPUs)."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

from sts_edge.quantization import dequantize, quantize  # noqa: E402
from sts_edge.triton_kernels.quantized_matmul import QuantizedWeight, quantized_matmul  # noqa: E402
from sts_edge.triton_kernels.verify_attention import KernelInputError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = {torch.bfloat16: 8e-3, torch.float16: 1e-3}  # relative Frobenius error of the rounded output


def random_mlx_weight(outputs: int, inputs: int, bits: int, group_size: int, dtype: torch.dtype, seed: int):
    """Random floats quantized by numpy's quantizer (MLX's rule): (packed words, scales, biases) as
    tensors on DEVICE in mlx-lm's layout, and the float64 decoding."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(outputs, inputs)).astype(np.float32) * rng.uniform(0.2, 2, size=(outputs, 1)).astype(np.float32)
    packed, scales, biases = quantize(weight, group_size, bits, "float16" if dtype == torch.float16 else "bfloat16")
    decoded = dequantize(packed, scales, biases, group_size, bits).astype(np.float64)
    as_tensor = lambda a: torch.from_numpy(a).to(DEVICE)  # noqa: E731
    return (as_tensor(packed.view(np.int32)), as_tensor(scales).to(dtype), as_tensor(biases).to(dtype)), decoded


def make_weight(outputs: int, inputs: int, bits: int, group_size: int, dtype: torch.dtype, seed: int):
    """A quantized weight in the general kernel's layout, and its float64 decoding."""
    (words, scales, biases), decoded = random_mlx_weight(outputs, inputs, bits, group_size, dtype, seed)
    return QuantizedWeight.from_mlx(words, scales, biases, bits, group_size), decoded


def rel_error(out: torch.Tensor, reference: np.ndarray) -> float:
    got = out.double().cpu().numpy()
    assert np.isfinite(got).all()
    return float(np.linalg.norm(got - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3, 5, 9, 16])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_quantized_matmul_matches_decode_then_multiply(bits, group_size, rows, dtype):
    dtype = DTYPES[dtype]
    outputs, inputs = 79, 512  # an odd number of outputs: the last tile is ragged
    weight, decoded = make_weight(outputs, inputs, bits, group_size, dtype, seed=bits * 1000 + group_size + rows)
    x = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(rows)).to(dtype).to(DEVICE)
    out = quantized_matmul(x, weight, splits=3)  # several shares of the groups, added by the second kernel
    assert out.shape == (rows, outputs) and out.dtype == dtype
    assert rel_error(out, x.double().cpu().numpy() @ decoded.T) < TOLERANCE[dtype]


@pytest.mark.parametrize("rows", [1, 40])
def test_one_share_and_prefill_sized_blocks(rows):
    """Without split-k the kernel writes the output itself; over 16 rows it tiles the rows too."""
    weight, decoded = make_weight(96, 256, 4, 64, torch.float16, seed=rows)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(0)).half().to(DEVICE)
    for splits, block_n in ((1, None), (None, 32), (2, 64)):
        out = quantized_matmul(x, weight, splits=splits, block_n=block_n)
        assert rel_error(out, x.double().cpu().numpy() @ decoded.T) < TOLERANCE[torch.float16]


def test_a_view_of_stacked_outputs_reads_its_own_columns():
    """Fused q/k/v keep views into one stacked weight: a slice of the outputs is a strided weight."""
    weight, decoded = make_weight(96, 256, 4, 32, torch.float16, seed=3)
    part = QuantizedWeight(weight.packed[:, 32:80], weight.scales[:, 32:80], weight.biases[:, 32:80], 4, 32)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1)).half().to(DEVICE)
    assert rel_error(quantized_matmul(x, part), x.double().cpu().numpy() @ decoded[32:80].T) < TOLERANCE[torch.float16]


def test_the_kernel_uses_the_biases_and_every_group():
    """Planted: zero activations outside one group, so only that group's scale and bias may count."""
    weight, decoded = make_weight(32, 256, 8, 64, torch.float16, seed=7)
    x = torch.zeros(2, 256, dtype=torch.float16, device=DEVICE)
    x[:, 128:192] = 1.0
    out = quantized_matmul(x, weight, splits=2)
    np.testing.assert_allclose(out.double().cpu().numpy()[0], decoded[:, 128:192].sum(axis=1), rtol=2e-3, atol=2e-2)


def test_bad_weights_and_inputs_raise_clear_errors():
    weight, _ = make_weight(16, 128, 4, 32, torch.float16, seed=1)
    x = torch.zeros(1, 128, dtype=torch.float16, device=DEVICE)
    with pytest.raises(KernelInputError, match="bits"):
        quantized_matmul(x, QuantizedWeight(weight.packed, weight.scales, weight.biases, 3, 32))
    with pytest.raises(KernelInputError, match="groups of"):
        quantized_matmul(x, QuantizedWeight(weight.packed, weight.scales, weight.biases, 4, 48))
    with pytest.raises(KernelInputError, match="x must be"):
        quantized_matmul(x.float(), weight)
    with pytest.raises(KernelInputError, match="x must be"):
        quantized_matmul(torch.zeros(1, 64, dtype=torch.float16, device=DEVICE), weight)
    with pytest.raises(KernelInputError, match="scales must be"):
        quantized_matmul(x, QuantizedWeight(weight.packed, weight.scales[:2], weight.biases, 4, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch's int4 kernel runs on NVIDIA GPUs")
@pytest.mark.parametrize("group_size", [32])
def test_pytorch_int4_layout_decodes_mlx_weights_exactly(group_size):
    """A 4-bit layer repacked for _weight_int4pack_mm (zero = bias + 8 * scale; the GPU's path for
    groups the tensor-core kernel does not take) gives the decoded weight's product."""
    from sts_edge.backends.torch.quantized import Int4PackWeight, QuantizedLinear

    weight, decoded = make_weight(384, 1024, 4, group_size, torch.bfloat16, seed=group_size)
    layer = QuantizedLinear(1024, 384, 4, group_size, bias=False)
    layer.weight = weight.packed.t().contiguous()
    layer.scales, layer.biases = weight.scales.t().contiguous(), weight.biases.t().contiguous()
    layer.repack(torch.bfloat16)
    assert isinstance(layer.packed, Int4PackWeight)
    for rows in (1, 5, 16):
        x = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(rows)).bfloat16().to(DEVICE)
        assert rel_error(layer(x), x.double().cpu().numpy() @ decoded.T) < TOLERANCE[torch.bfloat16]


# --- 4- and 8-bit weights on tensor cores (triton_kernels/tensor_core_matmul.py) --------------------

from sts_edge.triton_kernels import tensor_core_matmul as tensor_core  # noqa: E402


def make_tensor_core(outputs: int, inputs: int, bits: int, group_size: int, dtype: torch.dtype, seed: int):
    """A weight in the tensor-core layout, and its float64 decoding."""
    (words, scales, biases), decoded = random_mlx_weight(outputs, inputs, bits, group_size, dtype, seed)
    return tensor_core.TensorCoreWeight.from_mlx(words, scales, biases, bits, group_size, dtype), decoded


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("rows", [1, 3, 5, 9, 16])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_tensor_core_matches_decode_then_multiply(bits, group_size, rows, dtype):
    dtype = DTYPES[dtype]
    outputs, inputs = 79, 1024  # odd outputs: a ragged last tile; 16 blocks of 64 inputs, split in two
    assert tensor_core.launch_for(inputs, outputs, bits).splits > 1
    weight, decoded = make_tensor_core(outputs, inputs, bits, group_size, dtype, seed=group_size + rows + bits)
    assert weight.bits == bits
    x = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(rows)).to(dtype).to(DEVICE)
    want = x.double().cpu().numpy() @ decoded.T
    for _ in range(2):  # twice: the last program of each tile must have reset its arrival counter
        out = tensor_core.tensor_core_matmul(x, weight)
        assert out.shape == (rows, outputs) and out.dtype == dtype
        assert rel_error(out, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [2, 40])
def test_tensor_core_one_share_and_prefill_sized_blocks(bits, rows, monkeypatch):
    """One block of inputs: no split, the program writes the output itself. Over 16 rows the weight
    is decoded a slab of outputs at a time (three slabs here) and multiplied densely."""
    monkeypatch.setattr(tensor_core, "SLAB_WEIGHTS", 64 * 256)
    weight, decoded = make_tensor_core(600, 64, bits, 64, torch.bfloat16, seed=rows)
    assert tensor_core.launch_for(64, 600, bits).splits == 1
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(0)).bfloat16().to(DEVICE)
    assert rel_error(tensor_core.tensor_core_matmul(x, weight), x.double().cpu().numpy() @ decoded.T) \
        < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("bits", [4, 8])
def test_tensor_core_rows_stacking_and_planted_group(bits):
    """Looked-up rows are the decoded rows; stacked weights multiply as their outputs side by side;
    with activations zero outside one group only that group's scale and bias count."""
    first, decoded_first = make_tensor_core(48, 256, bits, 128, torch.float16, seed=1)
    second, decoded_second = make_tensor_core(80, 256, bits, 128, torch.float16, seed=2)
    ids = torch.tensor([0, 47, 5, 5], device=DEVICE)
    np.testing.assert_allclose(first.rows(ids, torch.float32).double().cpu().numpy(), decoded_first[[0, 47, 5, 5]],
                               rtol=1e-6, atol=1e-6)
    stacked = tensor_core.TensorCoreWeight.concatenate([first, second])
    x = torch.zeros(2, 256, dtype=torch.float16, device=DEVICE)
    x[:, 128:256] = 1.0
    out = tensor_core.tensor_core_matmul(x, stacked).double().cpu().numpy()
    want = np.concatenate([decoded_first, decoded_second])[:, 128:256].sum(axis=1)
    np.testing.assert_allclose(out[0], want, rtol=2e-3, atol=2e-2)


def test_tensor_core_bad_weights_and_inputs_raise_clear_errors():
    packed = torch.zeros(16, 128 // 8, dtype=torch.int32, device=DEVICE)
    scales = torch.ones(16, 4, dtype=torch.float16, device=DEVICE)
    with pytest.raises(KernelInputError, match="groups of"):
        tensor_core.TensorCoreWeight.from_mlx(packed, scales, scales, 4, 32, torch.float16)
    with pytest.raises(KernelInputError, match="bits"):
        tensor_core.TensorCoreWeight.from_mlx(packed, scales, scales, 2, 64, torch.float16)
    with pytest.raises(KernelInputError, match="bf16 or fp16"):
        tensor_core.TensorCoreWeight.from_mlx(packed, scales[:, :2], scales[:, :2], 4, 64, torch.float32)
    weight = tensor_core.TensorCoreWeight.from_mlx(packed, scales[:, :2], scales[:, :2], 4, 64, torch.float16)
    with pytest.raises(KernelInputError, match="x must be"):
        tensor_core.tensor_core_matmul(torch.zeros(1, 128, dtype=torch.bfloat16, device=DEVICE), weight)
    with pytest.raises(KernelInputError, match="x must be"):
        tensor_core.tensor_core_matmul(torch.zeros(1, 64, dtype=torch.float16, device=DEVICE), weight)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="Triton")
def test_4_and_8_bit_layers_with_groups_of_64_take_the_tensor_core_layout(monkeypatch):
    """The GPU's choice of layout, made on the CPU: 4- and 8-bit layers with groups of 64 or 128 and
    16-bit activations multiply on tensor cores (and give the decoded weight's product), others do not."""
    import sts_edge.backends.torch.quantized as quantized

    monkeypatch.setattr(quantized, "triton_layouts", lambda device: True)
    for bits, group_size, dtype, expected in ((4, 64, torch.bfloat16, True), (8, 128, torch.float16, True),
                                              (8, 64, torch.bfloat16, True), (4, 64, torch.float32, False),
                                              (8, 32, torch.bfloat16, False)):
        weight, decoded = make_weight(96, 256, bits, group_size, torch.float16, seed=group_size)
        layer = quantized.QuantizedLinear(256, 96, bits, group_size, bias=False)
        layer.weight = weight.packed.t().contiguous()
        layer.scales, layer.biases = weight.scales.t().contiguous(), weight.biases.t().contiguous()
        layer.repack(dtype)
        assert isinstance(layer.packed, tensor_core.TensorCoreWeight) == expected
        if expected:
            x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).to(dtype).to(DEVICE)
            assert rel_error(layer(x), x.double().cpu().numpy() @ decoded.T) < TOLERANCE[torch.bfloat16]
