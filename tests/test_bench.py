"""python -m sts_edge.bench end to end on tiny models: the JSON against its schema, peers that are not
installed reported as skipped, greedy agreement between modes, synthetic models, the plots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")

from sts_edge.bench import latency  # noqa: E402

SCHEMA = json.loads((Path(latency.__file__).parent / "schema.json").read_text())


def bench(tmp_path: Path, *args: str, env: dict | None = None) -> dict:
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "sts_edge.bench", *args, "--out", str(out), "--plot", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    jsonschema.validate(report, SCHEMA)
    assert "decode/s" in done.stdout  # the summary table
    return report


def rows_of(report: dict, system: str) -> list[dict]:
    return [row for row in report["results"] if row["system"] == system]


def test_bench_on_tiny_models_against_the_peers(model_dirs, draft_dir, tmp_path):
    report = bench(tmp_path, "--model", str(model_dirs["llama3"]), "--draft", str(draft_dir), "--backend", "torch-cpu",
                   "--contexts", "64,128", "--max-tokens", "6", "--gamma", "3", "--systems", "sts-edge,transformers,llama.cpp")
    for system in ("sts-edge:target", "sts-edge:dense", "sts-edge:sts", "transformers", "transformers:assisted"):
        rows = rows_of(report, system)
        assert [row["prompt_tokens"] for row in rows] == [64, 128], system
        for row in rows:
            assert row["generated"] == 6 and row["decode_tok_s"] > 0 and row["process_peak_rss_gb"] > 0
            # greedy: speculative modes (STS with a budget covering the context) reproduce the target alone
            if system.startswith("sts-edge"):
                assert row["shared_prefix_tokens"] == 6
    for row in rows_of(report, "sts-edge:sts") + rows_of(report, "sts-edge:dense"):
        assert row["acceptance_kind"] == "measured" and row["round"]["gamma"] == 3 and row["round"]["draft_ms"] > 0
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert rows_of(report, "llama.cpp") == [{"system": "llama.cpp", "skipped": "llama_cpp is not installed"}]
    assert (tmp_path / "latency_decode.png").stat().st_size > 0 and (tmp_path / "latency_rounds.png").stat().st_size > 0


def test_synthetic_models_declare_their_acceptance(tmp_path):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "vocab_size": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    shape = tmp_path / "tiny" / "config.json"
    shape.parent.mkdir()
    shape.write_text(json.dumps(config))
    env = {**__import__("os").environ, "STS_EDGE_CACHE": str(tmp_path / "cache")}
    report = bench(tmp_path, "--synthetic", "--model", str(shape), "--draft", str(shape), "--acceptance", "0.5",
                   "--backend", "torch-cpu", "--contexts", "48", "--max-tokens", "5", "--gamma", "2",
                   "--systems", "sts-edge:sts,llama.cpp", env=env)
    (row,) = rows_of(report, "sts-edge:sts")
    assert row["acceptance_kind"] == "declared" and row["acceptance"] == 0.5
    # 1 + 0.5 + 0.25 tokens per round at the measured round time
    round_seconds = (row["generated"] - 1) / row["decode_tok_s"] / row["round"]["rounds"]
    assert row["projected_decode_tok_s"] == pytest.approx(1.75 / round_seconds, rel=1e-6)
    assert report["models"]["target"]["synthetic"] and report["settings"]["declared_acceptance"] == 0.5
    assert rows_of(report, "llama.cpp")[0]["skipped"] in ("synthetic models have no GGUF", "llama_cpp is not installed")


def test_contexts_that_do_not_fit_are_skipped_with_the_reason(model_dirs, monkeypatch):
    monkeypatch.setattr(latency, "available_bytes", lambda backend: 2 * latency.weight_bytes(model_dirs["llama3"]) + 10**6)
    args = type("Args", (), {"max_tokens": 8})()
    fit, rows = latency.fitting({100: [1] * 100, 10**6: [1] * 10**6}, args, [model_dirs["llama3"]], "torch-cpu")
    assert list(fit) == [100]
    assert rows[0]["prompt_tokens"] == 10**6 and rows[0]["skipped"].startswith("does not fit")


def test_the_schema_rejects_what_it_should():
    row = {"system": "sts-edge:sts", "prompt_tokens": 10}  # measured fields missing
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"results": [row]}, SCHEMA)
    report = {"schema": "sts-edge-bench/1", "date": "2026-11-30", "device": "d", "platform": "p", "versions": {},
              "models": {"target": {"name": "a", "synthetic": False}, "draft": {"name": "b", "synthetic": False}},
              "settings": {"backend": "auto", "contexts": [1], "max_tokens": 1, "gamma": None, "budget": 1, "threads": None,
                           "declared_acceptance": None}, "results": [{"system": "llama.cpp", "skipped": "why"}]}
    jsonschema.validate(report, SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**report, "results": [{"system": "vllm", "skipped": "why"}]}, SCHEMA)


def test_unknown_systems_and_misplaced_acceptance_are_refused(capsys):
    with pytest.raises(SystemExit):
        latency.main(["--systems", "vllm"])
    assert "unknown system 'vllm'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        latency.main(["--acceptance", "0.5", "--systems", "sts-edge:target"])
    assert "--acceptance is for --synthetic" in capsys.readouterr().err
