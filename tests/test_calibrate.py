"""Calibration: the command writes maps that the runtime loads; bad files are refused."""

import json
import subprocess
import sys

import numpy as np
import pytest

from sts_edge import load
from sts_edge.calibration import CalibrationError, default_path, monotone_layer_map

BACKENDS = ["torch-cpu", "mlx"]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STS_EDGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run_calibrate(*args):
    return subprocess.run([sys.executable, "-m", "sts_edge.calibrate", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("backend", BACKENDS)
def test_calibration_writes_a_map_the_runtime_loads(backend, cache, model_dirs, draft_dir):
    result = run_calibrate("--model", model_dirs["llama3"], "--draft", draft_dir, "--backend", backend,
                           "--tokens", 1024, "--top-k", 16, "--layer-map", "calibrated")
    assert result.returncode == 0, result.stderr
    path = default_path(model_dirs["llama3"], draft_dir)
    assert path.is_file() and str(path) in result.stdout
    record = json.loads(path.read_text())
    for granularity, units in (("kv", 2), ("query", 4)):
        layer_map = record["layer_map"][granularity]
        assert len(layer_map) == 3 and all(0 <= l < 2 for l in layer_map) and layer_map == sorted(layer_map)
        assert np.array(record["head_map"][granularity]).shape == (3, units)
        assert 0 < record["jaccard"][granularity] <= 1

    engine = load(model_dirs["llama3"], draft=draft_dir, backend=backend, max_seq_len=256)
    assert engine.calibration["kv"].layer_map.tolist() == record["layer_map"]["kv"]
    assert engine.calibration["query"].head_map.tolist() == record["head_map"]["query"]
    prompt = np.random.default_rng(0).integers(0, 320, 150).tolist()
    stats = engine.generate(prompt, max_tokens=8, budget=16, sink=2, window=4).stats
    assert stats.sparsity > 0.5
    assert load(model_dirs["llama3"], draft=draft_dir, backend=backend, calibration=None).calibration == {}


def write_calibration(cache, model_dirs, draft_dir):
    result = run_calibrate("--model", model_dirs["llama3"], "--draft", draft_dir, "--backend", "torch-cpu",
                           "--tokens", 600, "--top-k", 8, "--probes", 3)
    assert result.returncode == 0, result.stderr
    return default_path(model_dirs["llama3"], draft_dir)


def test_corrupt_calibration_is_refused(cache, model_dirs, draft_dir):
    path = write_calibration(cache, model_dirs, draft_dir)
    path.write_text(path.read_text()[:100])
    with pytest.raises(CalibrationError, match="corrupt"):
        load(model_dirs["llama3"], draft=draft_dir, backend="torch-cpu")


def test_calibration_with_wrong_shapes_is_refused(cache, model_dirs, draft_dir):
    path = write_calibration(cache, model_dirs, draft_dir)
    record = json.loads(path.read_text())
    record["head_map"]["kv"][0][0] = 7  # the draft has 2 KV heads
    path.write_text(json.dumps(record))
    with pytest.raises(CalibrationError, match="do not fit"):
        load(model_dirs["llama3"], draft=draft_dir, backend="torch-cpu")


def test_calibration_for_another_pair_is_refused(cache, model_dirs, draft_dir):
    path = write_calibration(cache, model_dirs, draft_dir)
    with pytest.raises(CalibrationError, match="another target"):
        load(model_dirs["smollm2"], draft=draft_dir, backend="torch-cpu", calibration=path)
    with pytest.raises(CalibrationError, match="does not exist"):
        load(model_dirs["llama3"], draft=draft_dir, backend="torch-cpu", calibration=path.with_name("missing.json"))


def test_monotone_layer_map_is_the_best_monotone_map():
    rng = np.random.default_rng(0)
    scores = rng.random((5, 3))
    best = monotone_layer_map(scores)
    assert list(best) == sorted(best)
    # brute force over all non-decreasing maps
    import itertools

    candidates = [m for m in itertools.product(range(3), repeat=5) if list(m) == sorted(m)]
    top = max(candidates, key=lambda m: scores[np.arange(5), list(m)].sum())
    assert scores[np.arange(5), best].sum() == pytest.approx(scores[np.arange(5), list(top)].sum())


def test_calibration_of_aliases_is_saved_under_the_resolved_directories(cache, model_dirs, draft_dir, monkeypatch):
    """`--model qwen-coder-1.5b` style names resolve once, and the file is keyed by the directories."""
    import sts_edge.calibrate
    from sts_edge.calibrate import main

    names = {"target-alias": model_dirs["llama3"], "draft-alias": draft_dir}
    real = sts_edge.calibrate.resolve_model
    monkeypatch.setattr(sts_edge.calibrate, "resolve_model", lambda name, **kw: names.get(str(name)) or real(name, **kw))
    assert main(["--model", "target-alias", "--draft", "draft-alias", "--backend", "torch-cpu",
                 "--tokens", "400", "--top-k", "8", "--probes", "2"]) == 0
    assert default_path(model_dirs["llama3"], draft_dir).is_file()
