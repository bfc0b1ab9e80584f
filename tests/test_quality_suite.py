"""scripts/quality_suite.py end to end on tiny models (books replaced by a generated text), and the
retrieval task's planting of its facts."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "quality_suite.py"
BOOK = " ".join(f"Chapter {i}. The ship sailed on past the harbour wall and the quiet town." for i in range(400))


@pytest.fixture
def suite(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("quality_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("melville-moby_dick.txt", "austen-emma.txt", "austen-persuasion.txt"):
        (tmp_path / name).write_text(BOOK)
    monkeypatch.setattr(module, "TEXTS", tmp_path)
    return module


def test_every_fact_is_planted_once_in_order_at_its_depth(suite, model_dirs):
    from sts_edge.tokenizer import Tokenizer

    tokenizer = Tokenizer(model_dirs["llama3"])
    facts = [f" <fact {i}> " for i in range(len(suite.PLACES))]
    body = suite.planted_body(tokenizer, BOOK, facts, 2000)
    positions = [body.index(fact) for fact in facts]
    assert all(body.count(fact) == 1 for fact in facts) and positions == sorted(positions)
    length = len(tokenizer.encode(body, add_special_tokens=False))
    assert length <= 2000 + 5
    for i, position in enumerate(positions):  # each at depth (i + 1/2) / 12 of the text, give or take a token's text
        assert abs(position / len(body) - (i + 0.5) / len(facts)) < 0.03, i


def test_the_suite_asks_every_question_and_continues_several_files(suite, model_dirs, draft_dir, tmp_path, capsys):
    out = tmp_path / "quality.json"
    argv = ["--model", str(model_dirs["llama3"]), "--draft", str(draft_dir), "--contexts", "600", "--budgets", "16",
            "--gen-budgets", "16", "--policies", "sts,streaming", "--sink", "2", "--window", "8", "--eval-tokens", "20",
            "--code-files", "2", "--candidates", "1,3", "--out", str(out)]
    assert suite.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["questions"] == 12 and record["code_files"] == 2
    # blocks of 5 for perplexity/recall; generation at the backend's default (2 on the PyTorch CPU backend)
    assert record["gamma"] == 4 and record["generation_gamma"] == (2 if record["backend"] == "torch-cpu" else 4)
    [entry] = record["contexts"]
    assert {row["config"] for row in entry["retrieval"]} == {"dense", "sts 16", "sts x3 16", "streaming 16"}
    assert {row["policy"] for row in entry["perplexity_recall"]} >= {"sts", "sts x3"}
    for row in entry["retrieval"]:
        assert row["questions"] == 12 and round(row["accuracy"] * 12, 6) == round(row["accuracy"] * 12)
    dense = next(row for row in entry["code"] if row["config"] == "dense")
    assert dense["files"] == 2 and dense["agreement"] == 1.0  # the reference is dense's own continuation
    assert all(row["files"] == 2 and 0 <= row["agreement"] <= 1 for row in entry["code"])
    capsys.readouterr()
    assert suite.main(["--table", str(out)]) == 0  # the README's table, from the file alone
    table = capsys.readouterr().out.splitlines()
    for row in entry["perplexity_recall"]:
        if row["policy"] in ("sts", "sts x3", "streaming"):
            assert f"| {row['policy']} | {row['recall']:.2f} / {row['perplexity']:.1f} |" in table


def test_bad_counts_are_refused(suite):
    with pytest.raises(SystemExit):
        suite.main(["--questions", "13"])
    with pytest.raises(SystemExit):
        suite.main(["--code-files", "0"])
