"""Shared fixtures: tiny random models (tests/fixtures/models.py) as session-wide directories.

The factory itself lives in tests/fixtures/, importable by any test module (`from fixtures.models
import ...`); this file only turns it into pytest fixtures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest

from fixtures.models import ARCHS, load_hf_model, make_model_dir

# Without a GPU, the Triton kernels run on the CPU through Triton's interpreter (CI sets this too).
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The references the tests compare with run in float32; a CPU with native bfloat16 would otherwise
# load models in bfloat16 by default (test_cpu.py checks that choice itself).
os.environ.setdefault("STS_EDGE_CPU_DTYPE", "float32")

if TYPE_CHECKING:
    import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (skipped without one; README says how to run them)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Cases of the MLX backend skip where MLX is not installed (the lent GPU machine) instead of
    failing on the import; CI installs it, so there they run."""
    if importlib.util.find_spec("mlx") is not None:
        return
    skip = pytest.mark.skip(reason="mlx is not installed")
    for item in items:
        if getattr(item, "callspec", None) is not None and item.callspec.params.get("backend") == "mlx":
            item.add_marker(skip)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One directory per arch in ARCHS (seed 0, tokenizer "a"); "llama3" is sharded."""
    root = tmp_path_factory.mktemp("models")
    return {arch: make_model_dir(root / arch, arch, seed=0, shard=(arch == "llama3")) for arch in ARCHS}


@pytest.fixture(scope="session")
def draft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A different random llama3 (seed 1, 2 layers, same tokenizer): a draft for model_dirs["llama3"]."""
    return make_model_dir(tmp_path_factory.mktemp("draft") / "llama3-draft", "llama3", seed=1, num_hidden_layers=2)


@pytest.fixture(scope="session")
def other_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama3 whose tokenizer (variant "b") differs from the other fixtures' in content and size."""
    return make_model_dir(tmp_path_factory.mktemp("other-vocab") / "llama3-vocab-b", "llama3", tokenizer_variant="b")


@pytest.fixture(scope="session")
def make_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory for custom directories: make_model(arch, **same kwargs as make_model_dir) -> Path.

    Identical requests within a session return the same directory. Tests must not modify it;
    copy it (shutil.copytree) to a tmp_path first when a test needs to break a checkpoint.
    """
    built: dict[str, Path] = {}

    def make(arch: str, **kwargs: Any) -> Path:
        key = json.dumps([arch, kwargs], sort_keys=True, default=str)
        if key not in built:
            built[key] = make_model_dir(tmp_path_factory.mktemp(f"custom-{arch}"), arch, **kwargs)
        return built[key]

    return make


@pytest.fixture(scope="session")
def hf_model() -> Callable[[Path], "torch.nn.Module"]:
    """hf_model(model_dir) -> the transformers model for that directory (the oracle), cached.

    The returned model is shared across tests: use it under torch.no_grad() and do not mutate it.
    """
    loaded: dict[Path, Any] = {}

    def load(model_dir: Path) -> "torch.nn.Module":
        model_dir = Path(model_dir).resolve()
        if model_dir not in loaded:
            loaded[model_dir] = load_hf_model(model_dir)
        return loaded[model_dir]

    return load
