"""Bad input gets a clear error that says what to do, before any expensive work."""

import json
import shutil

import pytest

from sts_edge import ContextLengthError, IncompatibleModelsError, ModelLoadError, load
from sts_edge.backend import load_model
from sts_edge.config import ModelConfig

BACKENDS = ["torch-cpu", "mlx"]


def copy_model(src, tmp_path, name="model"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(tmp_path / "nope", backend="torch-cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(tmp_path / "empty", backend="torch-cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_weights(backend, model_dirs, tmp_path):
    path = copy_model(model_dirs["qwen2"], tmp_path)
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(path, backend)


def test_missing_shard(model_dirs, tmp_path):
    path = copy_model(model_dirs["llama3"], tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=shard.name):
        load_model(path, "torch-cpu")


def test_missing_tokenizer(model_dirs, tmp_path):
    path = copy_model(model_dirs["qwen2"], tmp_path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load(path, backend="torch-cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_that_do_not_fit_the_config(backend, model_dirs, tmp_path):
    path = copy_model(model_dirs["qwen2"], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="do not match config.json"):
        load_model(path, backend)


def test_unsupported_architecture(model_dirs, tmp_path):
    path = copy_model(model_dirs["llama3"], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"'gpt2' is not supported.*llama.*qwen2.*qwen3"):
        load(path, backend="torch-cpu")


def test_unsupported_rope_scaling():
    raw = json.loads('{"model_type": "llama", "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,'
                     '"num_attention_heads": 2, "vocab_size": 10, "rope_scaling": {"rope_type": "yarn", "factor": 4}}')
    with pytest.raises(ModelLoadError, match="yarn"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("other", ["b", "c"])
def test_vocabulary_mismatch_fails_before_weights_load(other, make_model, model_dirs, tmp_path, monkeypatch):
    """Variant b differs in size, variant c only in content; both must be refused."""
    draft = make_model("llama3", tokenizer_variant=other, num_hidden_layers=1)
    import sts_edge.api

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the compatibility check")

    monkeypatch.setattr(sts_edge.api, "load_model", no_weights)
    with pytest.raises(IncompatibleModelsError, match="different tokenizers"):
        load(model_dirs["llama3"], draft=draft, backend="torch-cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_longer_than_the_cache(backend, model_dirs, draft_dir):
    engine = load(model_dirs["llama3"], draft=draft_dir, backend=backend, max_seq_len=32)
    with pytest.raises(ContextLengthError, match="32 positions"):
        engine.generate(list(range(40)), max_tokens=4)
    with pytest.raises(ContextLengthError):  # fits alone, but not with a gamma-4 round after it
        engine.generate(list(range(29)), max_tokens=4, gamma=4)
    # The engine still works after refusing.
    result = engine.generate(list(range(10)), max_tokens=30, gamma=4)
    assert result.stats.finish_reason in ("context", "stop")
    assert 10 + len(result.tokens) <= 32


def test_bad_generation_arguments(model_dirs):
    engine = load(model_dirs["smollm2"], backend="torch-cpu", max_seq_len=64)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.generate("hi", max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate("hi", temperature=-0.5)


def test_unknown_backend(model_dirs):
    from sts_edge import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        load(model_dirs["smollm2"], backend="tpu")
