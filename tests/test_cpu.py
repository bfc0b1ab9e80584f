"""The PyTorch CPU path: threads, the activation dtype, quantized weights through our CPU kernel
(cpu_kernels/affine_matmul.cpp) and, where it cannot run, PyTorch's int4 kernel."""

import numpy as np
import pytest

from sts_edge.backend import load_model
from sts_edge.sampling import GREEDY
from sts_edge.speculative import GenerationStats, generate_tokens


def test_threads_default_to_physical_cores(monkeypatch):
    from sts_edge import host

    monkeypatch.delenv("STS_EDGE_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(host, "physical_cores", lambda: 3)
    assert host.cpu_threads() == 3
    assert host.cpu_threads(5) == 5
    monkeypatch.setenv("STS_EDGE_THREADS", "7")
    assert host.cpu_threads() == 7
    monkeypatch.delenv("STS_EDGE_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert host.cpu_threads() is None  # the framework honours OMP_NUM_THREADS itself
    with pytest.raises(ValueError, match="threads"):
        host.cpu_threads(0)


def test_physical_cores_counts_cores_not_hyper_threads(tmp_path, monkeypatch):
    from pathlib import Path

    from sts_edge import host

    cpuinfo = "".join(f"processor\t: {i}\nphysical id\t: {i // 4}\ncore id\t\t: {(i // 2) % 2}\n\n" for i in range(8))
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: cpuinfo if str(self) == "/proc/cpuinfo" else real_read(self, *a, **k))
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert host.physical_cores() == 4  # 2 packages x 2 cores, each with 2 hyper-threads


def test_a_loaded_cpu_model_uses_the_threads_it_was_given(model_dirs):
    import torch

    before = torch.get_num_threads()
    try:
        model = load_model(model_dirs["smollm2"], "torch-cpu", max_seq_len=32, threads=1)
        assert torch.get_num_threads() == 1 and model.precision.endswith("1 threads")
    finally:
        torch.set_num_threads(before)


def test_activation_dtype_follows_the_instruction_set(monkeypatch):
    import torch

    from sts_edge.backends.torch import loader

    monkeypatch.delenv("STS_EDGE_CPU_DTYPE", raising=False)
    for bf16, amx, expected in ((True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert loader.cpu_dtype() == expected
    monkeypatch.setenv("STS_EDGE_CPU_DTYPE", "float32")
    assert loader.cpu_dtype() == "float32"


@pytest.fixture(scope="module")
def quantized_pair(model_dirs, draft_dir, tmp_path_factory):
    """The llama3 fixture and its draft in 4 bits, the target in 8 bits too, and qwen2 (tied
    embeddings: the table is the LM head) in 4 bits."""
    from sts_edge.conversion import quantize_model
    from sts_edge.quantization import Quantization

    root = tmp_path_factory.mktemp("cpu-quantized")
    return {"int4": quantize_model(model_dirs["llama3"], root / "t4", Quantization(4, 32), progress=False),
            "int8": quantize_model(model_dirs["llama3"], root / "t8", Quantization(8, 32), progress=False),
            "draft": quantize_model(draft_dir, root / "d4", Quantization(4, 32), progress=False),
            "tied4": quantize_model(model_dirs["qwen2"], root / "q4", Quantization(4, 32), progress=False),
            # Groups of 64, which AMX tiles take (the others stay on the AVX2 loops).
            "int4g64": quantize_model(model_dirs["llama3"], root / "t4g64", Quantization(4, 64), progress=False),
            "draftg64": quantize_model(draft_dir, root / "d4g64", Quantization(4, 64), progress=False)}


def without_cpu_kernel(monkeypatch) -> None:
    """Load as on a machine where cpu_kernels/affine_matmul.cpp cannot be built."""
    from sts_edge.backends.torch import loader, quantized

    monkeypatch.setattr(quantized, "cpu_kernel_reads", lambda *args: False)
    monkeypatch.setattr(loader, "cpu_kernel_reads", lambda *args: False)
    monkeypatch.setattr(loader, "cpu_kernel_missing", lambda: "no compiler (a test)")


def decoded_reference(directory, ids) -> np.ndarray:
    """The logits of `directory` with every layer decoded to float32 at load (numpy's decoding)."""
    from sts_edge.backends.torch import loader

    real = loader.keeps_packed
    try:
        loader.keeps_packed = lambda *args: False
        return load_model(directory, "torch-cpu", max_seq_len=64, dtype="float32").verify(ids).logits()
    finally:
        loader.keeps_packed = real


def needs_cpu_kernel():
    from sts_edge.cpu_kernels.extension import kernel, unavailable_reason

    if kernel() is None:
        pytest.skip(f"the CPU kernel is unavailable here: {unavailable_reason()}")


@pytest.mark.parametrize("bits", ["int4", "int8"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_cpu_path_matches_the_decoded_weights(bits, dtype, quantized_pair):
    """4- and 8-bit layers stay packed in the checkpoint's own layout and run through our CPU kernel,
    as a prefill-sized block (decoded tiles) and as a decode-sized one; the reference is the same
    directory decoded to float32 in numpy at load (the loader's other path)."""
    from sts_edge.backends.torch.quantized import CpuAffineWeight, QuantizedLinear

    needs_cpu_kernel()
    ids = np.random.default_rng(0).integers(3, 300, 24).tolist()
    model = load_model(quantized_pair[bits], "torch-cpu", max_seq_len=64, dtype=dtype)
    layer = model.model.layers[0].mlp.gate_up
    assert isinstance(layer, QuantizedLinear) and isinstance(layer.packed, CpuAffineWeight)
    assert f"{bits} weights, {dtype} activations" in model.precision
    want = decoded_reference(quantized_pair[bits], ids)
    got = model.verify(ids).logits()
    model.rollback(0)
    model.prefill(ids[:20])
    got = np.concatenate([got[:20], model.verify(ids[20:]).logits()])  # the last 4 rows: the decode loop
    if dtype == "float32":  # float32 products of the same decoded weights, summed in another order
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
    else:  # bfloat16 activations round every layer's output: close, by norm and by choice
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.03
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_by_default_4_bit_layers_multiply_int8_rounded_activations(quantized_pair, monkeypatch):
    """With no dtype asked for, our kernel rounds decode-sized activations of 4-bit layers to int8
    per group (integer products); prefill-sized blocks and 8-bit layers stay float32."""
    from sts_edge.backends.torch import loader
    from sts_edge.backends.torch.quantized import QuantizedLinear

    needs_cpu_kernel()
    monkeypatch.delenv("STS_EDGE_CPU_DTYPE", raising=False)
    monkeypatch.setattr(loader, "cpu_dtype", lambda: "float32")
    ids = np.random.default_rng(0).integers(3, 300, 24).tolist()
    for name in ("int4", "tied4"):
        want = decoded_reference(quantized_pair[name], ids)
        model = load_model(quantized_pair[name], "torch-cpu", max_seq_len=64)
        assert "int4 weights (int8 activation products), float32 activations" in model.precision
        layer = model.model.layers[0].mlp.gate_up
        assert isinstance(layer, QuantizedLinear) and layer.packed.int8_activations
        if name == "tied4":
            assert model.model.embed_tokens.head.int8_activations
        np.testing.assert_allclose(model.verify(ids).logits(), want, atol=2e-4, rtol=2e-4)  # 24 rows: float32 tiles
        model.rollback(0)
        model.prefill(ids[:20])
        got = model.verify(ids[20:]).logits()  # 4 rows: integer products
        # Each layer rounds its inputs again (about 0.5% of a group's largest value): a few percent in all.
        assert 0 < np.linalg.norm(got - want[20:]) / np.linalg.norm(want[20:]) < 0.06, name
        assert (got.argmax(-1) == want[20:].argmax(-1)).mean() >= 0.75, name
    eight = load_model(quantized_pair["int8"], "torch-cpu", max_seq_len=64)
    assert "int8 weights, float32 activations" in eight.precision


@pytest.mark.parametrize("bits", ["int4", "int8"])
def test_without_our_kernel_the_cpu_falls_back_to_pytorchs(bits, quantized_pair, monkeypatch):
    """Where our kernel cannot be built, 4-bit layers run through PyTorch's CPU int4 kernel (8-bit
    ones are decoded at load: PyTorch's CPU int8 kernel takes one scale per output, not groups with
    biases), and the stats line says why."""
    import torch

    from sts_edge.backends.torch.quantized import Int4PackWeight, QuantizedLinear, cpu_int4_kernel_agrees

    without_cpu_kernel(monkeypatch)
    ids = np.random.default_rng(0).integers(3, 300, 24).tolist()
    model = load_model(quantized_pair[bits], "torch-cpu", max_seq_len=64, dtype="float32")
    layer = model.model.layers[0].mlp.gate_up
    if bits == "int4" and cpu_int4_kernel_agrees(torch.float32):
        assert isinstance(layer, QuantizedLinear) and isinstance(layer.packed, Int4PackWeight)
        assert "int4 weights (PyTorch's kernels: no compiler (a test))" in model.precision
    else:
        assert not isinstance(layer, QuantizedLinear)
    np.testing.assert_allclose(model.verify(ids).logits(), decoded_reference(quantized_pair[bits], ids),
                               atol=2e-4, rtol=2e-4)


def test_the_fallback_multiplies_4_bit_layers_in_bfloat16_inside_float32_models(quantized_pair, monkeypatch):
    """Without our kernel and with no dtype asked for, a float32 model on a CPU without native
    bfloat16 runs its 4-bit layers through the int4 kernel's bfloat16 path (its float32 path is a
    scalar loop)."""
    import torch

    from sts_edge.backends.torch import loader
    from sts_edge.backends.torch.quantized import QuantizedLinear, cpu_int4_kernel_agrees

    if not cpu_int4_kernel_agrees(torch.bfloat16):
        pytest.skip("PyTorch's CPU int4 kernel does not compute mlx-lm's rule here (layers are decoded)")
    without_cpu_kernel(monkeypatch)
    ids = np.random.default_rng(0).integers(3, 300, 24).tolist()
    want = load_model(quantized_pair["int4"], "torch-cpu", max_seq_len=64, dtype="float32").verify(ids).logits()
    monkeypatch.delenv("STS_EDGE_CPU_DTYPE", raising=False)
    monkeypatch.setattr(loader, "cpu_dtype", lambda: "float32")
    model = load_model(quantized_pair["int4"], "torch-cpu", max_seq_len=64)
    assert "int4 weights (bfloat16 products) (PyTorch's kernels" in model.precision
    layer = model.model.layers[0].mlp.gate_up
    assert isinstance(layer, QuantizedLinear) and layer.packed.scales_and_zeros.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32
    got = model.verify(ids).logits()
    assert 0 < np.linalg.norm(got - want) / np.linalg.norm(want) < 0.03
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("bits", ["int4", "int8"])
def test_speculative_greedy_on_the_quantized_cpu_path_equals_the_targets_greedy(bits, quantized_pair):
    target = load_model(quantized_pair[bits], "torch-cpu", max_seq_len=128)
    draft = load_model(quantized_pair["draft"], "torch-cpu", max_seq_len=128)
    prompt = np.random.default_rng(4).integers(3, 300, 30).tolist()
    alone = list(generate_tokens(target, prompt, GREEDY, 20))
    for gamma in (1, 4, 7):  # blocks of 2, 5 and 8 rows: one and two passes of the kernel
        stats = GenerationStats()
        assert list(generate_tokens(target, prompt, GREEDY, 20, draft=draft, gamma=gamma, stats=stats)) == alone
        assert stats.rounds < 20


def test_on_amx_tiles_speculative_greedy_equals_the_targets_greedy(quantized_pair, monkeypatch):
    """On a CPU with AMX, 4-bit layers in groups of 64 multiply int8 activations on tiles at every
    block size, prefill chunks included: the logits stay near the decoded weights', and blocks of
    2, 5 and 8 rows give the single steps' tokens (a row's bits do not depend on its block)."""
    from sts_edge.backends.torch import loader
    from sts_edge.cpu_kernels.extension import amx_ready

    needs_cpu_kernel()
    if not amx_ready():
        pytest.skip("this CPU has no AMX (or STS_EDGE_CPU_AMX=0)")
    monkeypatch.delenv("STS_EDGE_CPU_DTYPE", raising=False)
    monkeypatch.setattr(loader, "cpu_dtype", lambda: "float32")
    target = load_model(quantized_pair["int4g64"], "torch-cpu", max_seq_len=128)
    assert "int4 weights (int8 activation products, AMX)" in target.precision
    ids = np.random.default_rng(0).integers(3, 300, 24).tolist()
    want = decoded_reference(quantized_pair["int4g64"], ids)
    got = target.verify(ids).logits()
    assert 0 < np.linalg.norm(got - want) / np.linalg.norm(want) < 0.06
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75
    target.rollback(0)
    draft = load_model(quantized_pair["draftg64"], "torch-cpu", max_seq_len=128)
    prompt = np.random.default_rng(4).integers(3, 300, 30).tolist()
    alone = list(generate_tokens(target, prompt, GREEDY, 20))
    for gamma in (1, 4, 7):
        stats = GenerationStats()
        assert list(generate_tokens(target, prompt, GREEDY, 20, draft=draft, gamma=gamma, stats=stats)) == alone
        assert stats.rounds < 20


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["int4", "int4g64"])
def test_a_verification_block_gives_the_single_steps_logits_bit_for_bit(quantized_pair, name, dtype):
    """What makes speculative greedy output the target's own on the quantized CPU path: each row of
    a block is computed as its single step computes it, at any context length (our kernel's rows
    do not depend on the block; bfloat16 matmuls on the CPU round differently for different
    lengths, so attention runs row by row with a single step's shapes). Float32 weights go
    through PyTorch's own products, whose rounding depends on the number of rows."""
    needs_cpu_kernel()
    model = load_model(quantized_pair[name], "torch-cpu", max_seq_len=1200, dtype=dtype)
    ids = np.random.default_rng(5).integers(3, 300, 1100).tolist()
    for context in (40, 517, 1090):
        model.rollback(0)
        model.prefill(ids[:context])
        singles = np.concatenate([model.verify([token]).logits() for token in ids[context : context + 5]])
        model.rollback(context)
        np.testing.assert_array_equal(model.verify(ids[context : context + 5]).logits(), singles, err_msg=str(context))


def test_grouped_attention_equals_sdpa_on_the_cpu():
    """The CPU's decode-sized attention (each KV head's rows with all of its query heads at once)
    against PyTorch's own attention, causal block and index sets included."""
    import torch
    import torch.nn.functional as F

    from sts_edge.backends.torch.attention import causal_block_mask, grouped_attend

    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(8, 5, 16, generator=gen), torch.randn(2, 40, 16, generator=gen), torch.randn(2, 40, 16, generator=gen)
    mask = causal_block_mask(35, 5, q.device)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 0), v.repeat_interleave(4, 0), attn_mask=mask)
    torch.testing.assert_close(grouped_attend(q, k, v, mask), want, atol=1e-5, rtol=1e-5)
    want = F.scaled_dot_product_attention(q[:, :1], k.repeat_interleave(4, 0), v.repeat_interleave(4, 0))
    torch.testing.assert_close(grouped_attend(q[:, :1], k, v, None), want, atol=1e-5, rtol=1e-5)


def test_speculation_on_the_cpu_defaults_to_two_draft_tokens(model_dirs, draft_dir):
    """On the CPU a draft step is a large share of a target step, so a round drafts two tokens
    unless the caller asks for another number; other backends 4."""
    from sts_edge import api

    engine = api.load(model_dirs["llama3"], draft_dir, backend="torch-cpu", max_seq_len=64)
    assert engine.default_gamma == 2
    stats = GenerationStats()
    engine.generate(list(range(3, 20)), max_tokens=6, stats=stats)
    assert stats.gamma == 2
    engine.generate(list(range(3, 20)), max_tokens=6, stats=stats, gamma=3)
    assert stats.gamma == 3
    engine.backend = "cuda"
    assert engine.default_gamma == 4


def test_a_cpu_int4_kernel_that_disagrees_is_not_used(quantized_pair, monkeypatch):
    """Where PyTorch's CPU int4 kernel does not compute mlx-lm's rule, the layers are decoded at
    load and the logits are still the checkpoint's."""
    import torch

    from sts_edge.backends.torch import quantized
    from sts_edge.backends.torch.quantized import QuantizedLinear

    ids = np.random.default_rng(2).integers(3, 300, 16).tolist()
    without_cpu_kernel(monkeypatch)
    monkeypatch.setattr(quantized, "cpu_int4_kernel_agrees", lambda dtype: False)
    model = load_model(quantized_pair["int4"], "torch-cpu", max_seq_len=64, dtype="float32")
    assert not any(isinstance(m, QuantizedLinear) for m in model.model.modules())
    assert model.precision.startswith("float32 weights")
    assert torch.isfinite(torch.from_numpy(model.verify(ids).logits())).all()


def test_the_cpu_path_needs_no_triton(quantized_pair, tmp_path):
    """A CPU-only install (the README's first command) has no Triton: a 4-bit model still loads and
    generates, with the Triton import blocked."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['triton'] = None\n"
        "from sts_edge.backend import load_model\n"
        "from sts_edge.sampling import GREEDY\n"
        "from sts_edge.speculative import generate_tokens\n"
        f"model = load_model({str(quantized_pair['int4'])!r}, 'torch-cpu', max_seq_len=64)\n"
        "print(len(list(generate_tokens(model, [5, 6, 7, 8], GREEDY, 5))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "5"
