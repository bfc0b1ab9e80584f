"""scripts/eval_quality.py end to end on tiny models: JSON fields, recall bounds, the plot."""

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "eval_quality.py"
TEXT = ("Reading a long document is much like sailing at night: you keep a few landmarks in view. " * 40
        + "def area(r):\n    return 3.14159 * r * r\n" * 20)


@pytest.mark.parametrize("backend", ["torch-cpu", "mlx"])
def test_eval_quality_writes_consistent_results(backend, model_dirs, draft_dir, tmp_path, monkeypatch):
    text = tmp_path / "book.txt"
    text.write_bytes(TEXT.replace("\n", "\r\n").encode("latin-1"))  # CRLF Latin-1, as some books are
    out = tmp_path / "out" / "quality.json"
    argv = ["eval_quality.py", "--model", str(model_dirs["llama3"]), "--draft", str(draft_dir), "--text", str(text),
            "--context", "300", "--eval-tokens", "40", "--budgets", "16,48,10%", "--sink", "2", "--window", "8",
            "--policies", "dense,sts,streaming,quest", "--granularity", "kv,query", "--backend", backend, "--calibration", "none",
            "--candidates", "1,3", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert done.value.code == 0
    record = json.loads(out.read_text())
    rows = [r for r in record["results"] if r["policy"] != "dense-reference"]
    assert {r["policy"] for r in rows} == {"dense", "sts", "sts x3", "streaming", "quest", "oracle"}
    oracle = {(r["budget"], r["granularity"]): r["recall"] for r in rows if r["policy"] == "oracle"}
    assert len(oracle) == 6  # three budgets, both granularities
    for r in rows:
        assert 0 <= r["top1_agreement"] <= 1 and r["kl"] >= -1e-9 and r["perplexity"] > 1
        if r["policy"] == "dense":
            assert r["top1_agreement"] == 1 and abs(r["kl"]) < 1e-9 and r["sparsity"] == 0
            continue
        assert r["recall"] <= oracle[r["budget"], r["granularity"]] + 1e-9
        assert r["sparsity"] > 0.5
    assert all(r["recall_vs_oracle"] == 1.0 for r in rows if r["policy"] == "oracle")
    dense_ppl = next(r["perplexity"] for r in record["results"] if r["policy"] == "dense-reference")
    assert next(r for r in rows if r["policy"] == "dense")["perplexity"] == pytest.approx(dense_ppl)
    assert out.with_suffix(".png").stat().st_size > 10_000
