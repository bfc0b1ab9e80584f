"""The user path: load directories, tokenize, apply the chat template, generate and stream."""

import subprocess
import sys

import numpy as np
import pytest

from sts_edge import load
from sts_edge.config import ModelConfig
from sts_edge.mask import MaskPolicy
from sts_edge.tokenizer import Tokenizer

BACKENDS = ["torch-cpu", "mlx"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does the lighthouse stand?"}]


@pytest.mark.parametrize("arch", ["llama3", "qwen2", "qwen3", "mistral", "smollm2"])
def test_config_reads_what_transformers_reads(arch, model_dirs, hf_model):
    config = ModelConfig.from_model_dir(model_dirs[arch])
    hf = hf_model(model_dirs[arch]).config
    assert config.num_hidden_layers == hf.num_hidden_layers
    assert config.num_key_value_heads == hf.num_key_value_heads
    assert config.head_dim == getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    assert config.tie_word_embeddings == hf.tie_word_embeddings
    assert config.attention_bias == (arch == "qwen2")
    assert config.qk_norm == (arch == "qwen3")


def test_llama3_frequencies_match_transformers(model_dirs, hf_model):
    hf = hf_model(model_dirs["llama3"])
    expected = hf.model.rotary_emb.inv_freq.numpy()
    got = ModelConfig.from_model_dir(model_dirs["llama3"]).rope_inv_freq()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert not np.allclose(got, 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16))  # scaling applied


def test_tokenizer_and_chat_template_match_transformers(model_dirs):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(model_dirs["llama3"])
    tokenizer = Tokenizer(model_dirs["llama3"])
    text = "The keeper climbed the stairs. def f(x):\n    return x * 2  # ünïcödé 灯台"
    assert tokenizer.encode(text) == reference(text)["input_ids"]
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.apply_chat_template(MESSAGES) == reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tokenizer.encode_chat(MESSAGES) == list(reference.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False))
    eos = {reference.convert_tokens_to_ids("<|eot_id|>"), reference.convert_tokens_to_ids("<|end_of_text|>")}
    assert tokenizer.eos_token_ids == eos


def test_streaming_detokenizer_reassembles_multibyte_text(model_dirs):
    tokenizer = Tokenizer(model_dirs["llama3"])
    text = "灯台 🌊 ünïcödé text, with bytes split across tokens"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = tokenizer.detokenizer()
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_and_stream_through_the_api(backend, model_dirs, draft_dir):
    engine = load(model_dirs["llama3"], draft=draft_dir, backend=backend, max_seq_len=256)
    with_draft = engine.generate(MESSAGES, max_tokens=16, gamma=3)
    without = engine.generate(MESSAGES, max_tokens=16, use_draft=False)
    assert with_draft.tokens == without.tokens
    assert with_draft.stats.rounds > 0 and with_draft.stats.draft_tokens == 3 * with_draft.stats.rounds  # it drafted
    assert "".join(engine.stream(MESSAGES, max_tokens=16, gamma=3)) == with_draft.text
    sampled = [engine.generate("The old lighthouse", max_tokens=12, temperature=0.8, seed=5).tokens for _ in range(2)]
    assert sampled[0] == sampled[1]  # same seed, same tokens


def test_one_request_at_a_time(model_dirs):
    engine = load(model_dirs["smollm2"], backend="torch-cpu", max_seq_len=128)
    first = engine.stream("The harbour", max_tokens=8)
    next(first)
    with pytest.raises(RuntimeError, match="already generating"):
        engine.generate("The harbour", max_tokens=4)
    first.close()
    assert engine.generate("The harbour", max_tokens=4).tokens


def test_generate_cli(model_dirs, draft_dir):
    result = subprocess.run(
        [sys.executable, "-m", "sts_edge.generate", "--model", str(model_dirs["llama3"]), "--draft", str(draft_dir),
         "--prompt", "Hello", "--max-tokens", "8", "--backend", "torch-cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "acceptance" in result.stderr and "tok/s" in result.stderr
    expected = load(model_dirs["llama3"], backend="torch-cpu").generate([{"role": "user", "content": "Hello"}], max_tokens=8).text
    assert result.stdout.rstrip("\n") == expected


def test_generate_cli_reports_sparsity(model_dirs, draft_dir):
    prompt = "The old lighthouse stood at the edge of the harbour. " * 12
    result = subprocess.run(
        [sys.executable, "-m", "sts_edge.generate", "--model", str(model_dirs["llama3"]), "--draft", str(draft_dir),
         "--prompt", prompt, "--raw", "--max-tokens", "6", "--backend", "mlx", "--policy", "sts", "--budget", "10%",
         "--sink", "2", "--window", "8", "--gamma", "3", "--calibration", "none"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    default = MaskPolicy().candidates
    assert f"sparse verification (sts, two-stage x{default})" in result.stderr and "gamma 3" in result.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "sts_edge.generate", "--model", str(model_dirs["llama3"]), "--prompt", "x", "--budget", "lots"],
        capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode != 0 and "budget must be" in bad.stderr
