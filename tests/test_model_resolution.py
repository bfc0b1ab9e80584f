"""Model aliases, repo ids and offline behaviour, against a fake local Hugging Face cache."""

import shutil

import pytest

from sts_edge import ModelLoadError, load
from sts_edge.models import ALIASES, list_models, resolve_model


def fake_hub_cache(root, repo, source_dir, revision="0123456789abcdef0123456789abcdef01234567"):
    """Lay a model out the way huggingface_hub does: models--owner--name/{refs/main, snapshots/REV/...}."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    shutil.copytree(source_dir, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An offline hub cache: huggingface_hub may only read what is on disk."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_local_directory_wins(model_dirs):
    assert resolve_model(model_dirs["qwen2"]) == model_dirs["qwen2"]


def test_alias_resolves_from_the_cache(hub, model_dirs):
    snapshot = fake_hub_cache(hub, ALIASES["llama-8b"].repo, model_dirs["llama3"])
    assert resolve_model("llama-8b", cache_dir=hub) == snapshot
    assert resolve_model("llama-8b") == snapshot  # HF_HUB_CACHE and HF_HUB_OFFLINE from the environment


def test_quantized_variant_is_preferred_when_asked(hub, model_dirs):
    plain = fake_hub_cache(hub, ALIASES["llama-1b"].repo, model_dirs["llama3"])
    quantized = fake_hub_cache(hub, ALIASES["llama-1b"].quantized, model_dirs["smollm2"])
    assert resolve_model("llama-1b") == plain
    assert resolve_model("llama-1b", quantized=True) == quantized


def test_repo_id_resolves_and_loads_through_the_api(hub, model_dirs, draft_dir):
    fake_hub_cache(hub, "someone/tiny-target", model_dirs["llama3"])
    fake_hub_cache(hub, "someone/tiny-draft", draft_dir)
    engine = load("someone/tiny-target", draft="someone/tiny-draft", backend="torch-cpu", calibration=None)
    reference = load(model_dirs["llama3"], draft=draft_dir, backend="torch-cpu", calibration=None)
    assert engine.generate("The lighthouse", max_tokens=6).tokens == reference.generate("The lighthouse", max_tokens=6).tokens


def test_offline_and_missing_says_what_to_do(hub):
    with pytest.raises(ModelLoadError, match=r"qwen-7b \(Qwen/Qwen2.5-7B-Instruct\) is not in .* offline mode is on"):
        resolve_model("qwen-7b")
    with pytest.raises(ModelLoadError, match="offline"):
        resolve_model("nobody/nothing")


def test_unknown_names_are_explained(tmp_path):
    with pytest.raises(ModelLoadError, match="list-models"):
        resolve_model("llama-9000b")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(tmp_path / "missing" / "dir")


def test_alias_table_is_listed():
    table = list_models()
    for name, alias in ALIASES.items():
        assert name in table and alias.repo in table
