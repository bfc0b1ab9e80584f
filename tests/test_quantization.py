"""The quantized format (mlx-lm's affine groups): decoding, and both backends against mlx-lm."""

import os
from pathlib import Path

import numpy as np
import pytest

from sts_edge.backend import load_model
from sts_edge.quantization import dequantize


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantize_matches_mlx(bits, group_size):
    import mlx.core as mx

    weights = mx.array(np.random.default_rng(bits).normal(size=(24, 256)).astype(np.float32))
    packed, scales, biases = mx.quantize(weights, group_size=group_size, bits=bits)
    expected = np.array(mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits))
    got = dequantize(np.array(packed), np.array(scales), np.array(biases), group_size, bits)
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.fixture(scope="module", params=["uniform-4bit", "mixed-3-6bit"])
def quantized_dir(request, model_dirs, tmp_path_factory):
    """mlx-lm's own converter writes the quantized checkpoint (the format users download)."""
    from mlx_lm import convert

    out = tmp_path_factory.mktemp(request.param) / "model"
    if request.param == "uniform-4bit":
        convert(str(model_dirs["qwen2"]), mlx_path=str(out), quantize=True, q_group_size=32, q_bits=4)
    else:  # per-module bit widths in config.json
        convert(str(model_dirs["llama3"]), mlx_path=str(out), quantize=True, q_group_size=32, quant_predicate="mixed_3_6")
    return out


@pytest.mark.parametrize("backend", ["mlx", "torch-cpu"])
def test_quantized_checkpoints_match_mlx_lm(backend, quantized_dir):
    import mlx.core as mx
    from mlx_lm.utils import load_model as mlx_lm_load

    reference, _ = mlx_lm_load(Path(quantized_dir))
    ids = np.random.default_rng(0).integers(0, 320, 30).tolist()
    expected = np.array(reference(mx.array([ids]))[0].astype(mx.float32))
    model = load_model(quantized_dir, backend, max_seq_len=64, dtype="float32")  # exact products on the CPU
    got = np.concatenate([model.verify(ids[:20]).logits()] + [model.prefill([t]).logits() for t in ids[20:]])
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)


def test_quantized_layers_stay_quantized_in_mlx(quantized_dir):
    import mlx.nn as nn

    model = load_model(quantized_dir, "mlx", max_seq_len=32)
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.QuantizedLinear)


# --- our converter: mlx-lm's format, read by mlx-lm and both backends ----------------------------


@pytest.fixture(scope="module")
def our_quantized(model_dirs, tmp_path_factory):
    """The qwen2 fixture through `python -m sts_edge.convert --model DIR --quantize 4 --group-size 32`."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("ours") / "qwen2-4bit"
    done = subprocess.run([sys.executable, "-m", "sts_edge.convert", "--model", str(model_dirs["qwen2"]), "--quantize", "4",
                           "--group-size", "32", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("block_rows", [None, 5])
def test_our_quantizer_is_mlx_s_rule(block_rows, monkeypatch):
    """Bit for bit, whole or in blocks of rows (a block of 5 leaves a partial last one)."""
    import mlx.core as mx

    from sts_edge import quantization

    if block_rows:
        monkeypatch.setattr(quantization, "BLOCK_VALUES", block_rows * 256)
    weights = np.random.default_rng(3).normal(size=(32, 256)).astype(np.float32)
    for bits, group_size in ((4, 32), (4, 64), (8, 128), (2, 32), (3, 32), (6, 64)):
        ours = quantization.quantize(weights, group_size, bits)
        theirs = mx.quantize(mx.array(weights), group_size=group_size, bits=bits)
        for got, want in zip(ours, theirs):
            np.testing.assert_array_equal(got, np.array(want))


def test_mlx_lm_and_both_backends_read_our_quantized_directory(our_quantized, model_dirs):
    import json

    import mlx.core as mx
    from mlx_lm.utils import load_model as mlx_lm_load

    config = json.loads((our_quantized / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert (our_quantized / "tokenizer.json").read_bytes() == (model_dirs["qwen2"] / "tokenizer.json").read_bytes()
    reference, _ = mlx_lm_load(our_quantized)
    ids = np.random.default_rng(1).integers(0, 320, 24).tolist()
    expected = np.array(reference(mx.array([ids]))[0].astype(mx.float32))
    for backend in ("torch-cpu", "mlx"):
        got = load_model(our_quantized, backend, max_seq_len=64, dtype="float32").verify(ids).logits()
        np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)
    # And the quantization is real: the float model's logits differ by more than rounding.
    float_logits = load_model(model_dirs["qwen2"], "torch-cpu", max_seq_len=64).verify(ids).logits()
    assert np.abs(float_logits - expected).max() > 1e-2


def test_converting_twice_gives_identical_bytes_and_embeddings_can_stay(model_dirs, tmp_path):
    import json

    from sts_edge.conversion import quantize_model
    from sts_edge.quantization import Quantization

    settings = Quantization(8, 64, keep_embeddings=True)
    first = quantize_model(model_dirs["llama3"], tmp_path / "a", settings, progress=False)
    second = quantize_model(model_dirs["llama3"], tmp_path / "b", settings, progress=False)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert all((first / name).read_bytes() == (second / name).read_bytes() for name in names)
    index = json.loads((first / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.embed_tokens.scales" not in index and "lm_head.scales" not in index
    assert "model.layers.0.mlp.down_proj.scales" in index and "model.norm.scales" not in index
    logits = [load_model(first, backend, max_seq_len=32).verify([5, 6, 7]).logits() for backend in ("torch-cpu", "mlx")]
    np.testing.assert_allclose(logits[0], logits[1], atol=2e-4, rtol=1e-4)


def test_gguf_files_convert_straight_to_the_quantized_format(make_model, tmp_path):
    from test_convert import write_tiny_gguf

    from sts_edge.conversion import convert
    from sts_edge.quantization import Quantization

    gguf = write_tiny_gguf(make_model("smollm2"), tmp_path / "tiny.gguf")
    plain = convert(gguf, tmp_path / "plain", progress=False)
    quantized = convert(gguf, tmp_path / "q8", progress=False, quantization=Quantization(8, 32))
    ids = list(range(3, 30))
    want = load_model(plain, "torch-cpu", max_seq_len=32).verify(ids).logits()
    for backend in ("torch-cpu", "mlx"):
        got = load_model(quantized, backend, max_seq_len=32).verify(ids).logits()
        # 8 bits: close to the plain conversion, not equal
        assert 0 < np.abs(got - want).mean() < 0.03 * np.abs(want).mean()
        assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("problem", ["bits", "group", "uneven", "quantized-source", "not-a-model"])
def test_bad_quantization_requests_fail_before_writing(problem, make_model, model_dirs, our_quantized, tmp_path, monkeypatch):
    import subprocess
    import sys

    source = {"uneven": make_model("smollm2", hidden_size=80, intermediate_size=160),
              "quantized-source": our_quantized, "not-a-model": tmp_path}.get(problem, model_dirs["llama3"])
    bits, group = {"bits": ("3", "64"), "group": ("4", "48")}.get(problem, ("4", "64"))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "sts_edge.convert", "--model", str(source), "--quantize", bits,
                           "--group-size", group, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    expected = {"bits": "invalid choice", "group": "invalid choice", "uneven": "groups of 64 do not divide",
                "quantized-source": "quantized already", "not-a-model": "no config.json"}[problem]
    assert expected in done.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# --- the GPU path, on the CPU: packed weights through the Triton kernels ---------------------------


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors through Triton's interpreter; "
                    "on a GPU the model takes this path by itself")
def test_speculative_and_sts_on_packed_weights_through_the_kernels(make_model, monkeypatch, tmp_path):
    """The model's GPU path, on the CPU under the interpreter: packed 4-bit (target) and 8-bit
    (draft) weights with groups of 64 through the tensor-core kernel, attention
    through the verification kernels, the draft's cache in 4 bits (written by rope_and_cache, its
    rows decoded as the kernels read them). Speculative greedy output (and STS with a budget covering the
    context) equals the target stepping alone on the same path."""
    import sts_edge.backends.torch.attention as attention
    import sts_edge.backends.torch.loader as loader
    import sts_edge.backends.torch.model as model
    import sts_edge.backends.torch.quantized as quantized
    from sts_edge.backends.torch.quantized import QuantizedLinear
    from sts_edge.triton_kernels.tensor_core_matmul import TensorCoreWeight
    from sts_edge.conversion import quantize_model
    from sts_edge.mask import MaskPolicy
    from sts_edge.quantization import Quantization
    from sts_edge.sampling import GREEDY
    from sts_edge.speculative import generate_tokens

    monkeypatch.setattr(loader, "keeps_packed", lambda device, *args: True)
    monkeypatch.setattr(quantized, "triton_layouts", lambda device: True)
    kernels = lambda device, dtype, n, head_dim: n <= 16  # noqa: E731
    monkeypatch.setattr(attention, "use_kernels", kernels)
    monkeypatch.setattr(model, "use_kernels", kernels)
    target_dir = quantize_model(make_model("llama3", head_dim=64, num_hidden_layers=3), tmp_path / "target",
                                Quantization(4, 64), progress=False)
    draft_dir = quantize_model(make_model("llama3", seed=1, head_dim=64, num_hidden_layers=2), tmp_path / "draft",
                               Quantization(8, 64), progress=False)
    target = load_model(target_dir, "torch-cpu", max_seq_len=128, dtype="float16")
    draft = load_model(draft_dir, "torch-cpu", max_seq_len=128, dtype="float16", kv_bits=4)
    assert isinstance(target.model.layers[0].mlp.down_proj, QuantizedLinear)
    assert target.model.layers[0].mlp.down_proj.packed.bits == 4
    assert isinstance(draft.model.layers[0].mlp.down_proj.packed, TensorCoreWeight)
    assert draft.model.layers[0].mlp.down_proj.packed.bits == 8
    prompt = np.random.default_rng(2).integers(3, 300, 40).tolist()
    alone = list(generate_tokens(target, prompt, GREEDY, 12))
    assert list(generate_tokens(target, prompt, GREEDY, 12, draft=draft, gamma=3)) == alone
    covering = MaskPolicy("sts", budget=128, sink=2, window=4)
    assert list(generate_tokens(target, prompt, GREEDY, 12, draft=draft, gamma=3, policy=covering)) == alone


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_4bit_model_on_gpu_decodes_as_its_decoded_twin(make_model, tmp_path, dtype):
    """On a GPU, a 4-bit directory (and its 8-bit draft) runs through the tensor-core kernel inside
    the CUDA graphs: a layer's product matches its decoded weight's, and speculative greedy output
    and STS with a covering budget equal the target's own greedy output."""
    import torch

    from sts_edge.conversion import quantize_model
    from sts_edge.mask import MaskPolicy
    from sts_edge.quantization import Quantization
    from sts_edge.sampling import GREEDY
    from sts_edge.speculative import generate_tokens
    from sts_edge.triton_kernels.tensor_core_matmul import TensorCoreWeight

    target_dir = quantize_model(make_model("llama3", head_dim=64, num_hidden_layers=3), tmp_path / "target",
                                Quantization(4, 64), progress=False)
    draft_dir = quantize_model(make_model("llama3", seed=1, head_dim=64, num_hidden_layers=2), tmp_path / "draft",
                               Quantization(8, 64), progress=False)
    target = load_model(target_dir, "cuda", max_seq_len=256, dtype=dtype)
    draft = load_model(draft_dir, "cuda", max_seq_len=256, dtype=dtype)
    layer = target.model.layers[0]
    assert isinstance(layer.mlp.down_proj.packed, TensorCoreWeight)
    assert draft.model.layers[0].mlp.down_proj.packed.bits == 8
    prompt = np.random.default_rng(2).integers(3, 300, 40).tolist()
    with torch.inference_mode():
        for down in (layer.mlp.down_proj, draft.model.layers[0].mlp.down_proj):
            decoded = down.packed.rows(torch.arange(down.outputs, device="cuda"), torch.float32)
            x = torch.randn(5, down.inputs, device="cuda").to(getattr(torch, dtype))
            want = (x.float() @ decoded.t())
            assert float((down(x).float() - want).norm() / want.norm()) < 1e-2
    alone = list(generate_tokens(target, prompt, GREEDY, 24))
    assert list(generate_tokens(target, prompt, GREEDY, 24, draft=draft, gamma=4)) == alone
    covering = MaskPolicy("sts", budget=256, sink=2, window=4)
    assert list(generate_tokens(target, prompt, GREEDY, 24, draft=draft, gamma=4, policy=covering)) == alone
