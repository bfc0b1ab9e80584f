"""The command-line entry points: settings are checked before any weights load, help says each default once."""

import subprocess
import sys

import pytest

import sts_edge.api
from sts_edge import chat, generate, server

ENTRY_POINTS = {"chat": chat.main, "generate": generate.main, "server": server.main}
# (flags, words the error must contain). The target fixture has 3 layers and a 512-token context.
BAD_SETTINGS = [
    (["--gamma", "0"], "gamma"),
    (["--gamma", "16"], "between 1 and 15"),
    (["--temp", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-k", "-1"], "top_k"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--max-seq-len", "1"], "--max-seq-len"),
    (["--sink", "-1"], "sink"),
    (["--window", "100000"], "window (100000)"),
    (["--dense-layers", "99"], "dense layers [99]"),
    (["--candidates", "0"], "candidates must be a whole number >= 1"),
]


@pytest.fixture()
def weights_never_load(monkeypatch):
    def fail_loudly(*args, **kwargs):
        raise AssertionError("weights were loaded before the settings were checked")

    monkeypatch.setattr(sts_edge.api, "load_model", fail_loudly)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_bad_settings_fail_before_any_weights_load(entry, model_dirs, draft_dir, weights_never_load, capsys):
    for flags, words in BAD_SETTINGS:
        if entry == "server" and flags[0] in ("--temp", "--top-p", "--top-k", "--max-tokens"):
            continue  # per request on the server
        argv = ["--model", str(model_dirs["llama3"]), "--draft", str(draft_dir), "--backend", "torch-cpu", *flags]
        if entry == "generate":
            argv += ["--prompt", "hi"]
        assert ENTRY_POINTS[entry](argv) == 1, flags
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err, (flags, err)


@pytest.mark.parametrize("typed", ["150%", "100%", "1.5", "0", "-3", "lots"])
def test_bad_budgets_are_echoed_as_typed(typed, weights_never_load, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--prompt", "hi", "--budget", typed])
    assert exit_info.value.code == 2
    assert repr(typed) in capsys.readouterr().err


def test_help_states_each_default_once_and_the_sts_trade():
    for name in ("chat", "generate", "server", "convert", "calibrate"):
        text = subprocess.run([sys.executable, "-m", f"sts_edge.{name}", "--help"], capture_output=True, text=True,
                              timeout=120, env={"COLUMNS": "2000", "PATH": ""}).stdout
        assert "(default: None)" not in text and "(default: False)" not in text, name
        for line in text.splitlines():  # one flag's help is one line at this width
            assert line.count("default") <= 1 or not line.lstrip().startswith("-"), (name, line)
        if name in ("chat", "generate", "server"):
            assert "--policy dense gives exactly the target's output" in text
            assert "sts is the default" in text and "1-15" in text


def test_list_models_columns_line_up():
    lines = subprocess.run([sys.executable, "-m", "sts_edge.chat", "--list-models"], capture_output=True, text=True,
                           timeout=60).stdout.splitlines()
    table = [line for line in lines if line.split() and not line.startswith(("Any", "pip"))]
    repo_column = table[0].index("repo")
    assert all(line[repo_column - 2 : repo_column] == "  " and line[repo_column] != " " for line in table)
    assert any("qwen-coder-1.5b" in line for line in table)
