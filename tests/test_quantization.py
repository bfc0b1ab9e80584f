"""The quantized format (mlx-lm's affine groups): decoding, and both backends against mlx-lm."""

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
    model = load_model(quantized_dir, backend, max_seq_len=64)
    got = np.concatenate([model.verify(ids[:20]).logits()] + [model.prefill([t]).logits() for t in ids[20:]])
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)


def test_quantized_layers_stay_quantized_in_mlx(quantized_dir):
    import mlx.nn as nn

    model = load_model(quantized_dir, "mlx", max_seq_len=32)
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.QuantizedLinear)
