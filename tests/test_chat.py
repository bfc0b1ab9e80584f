"""The chat REPL, driven through piped stdin and through a pseudo-terminal."""

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from sts_edge import load

ANSWER_TOKENS = 10


def chat_command(model_dirs, draft_dir, *extra):
    return [sys.executable, "-m", "sts_edge.chat", "--model", str(model_dirs["llama3"]), "--draft", str(draft_dir),
            "--max-tokens", str(ANSWER_TOKENS), "--backend", "torch-cpu", "--calibration", "none", *extra]


@pytest.fixture(scope="module")
def engine(model_dirs, draft_dir):
    return load(model_dirs["llama3"], draft=draft_dir, backend="torch-cpu", calibration=None)


def expected_answers(engine, turns, system=None):
    """What the Python API answers for the same conversation, turn by turn, from scratch."""
    history = [{"role": "system", "content": system}] if system else []
    answers = []
    for turn in turns:
        history.append({"role": "user", "content": turn})
        text = engine.generate(history, max_tokens=ANSWER_TOKENS).text
        history.append({"role": "assistant", "content": text})
        answers.append(text)
    return answers


def test_piped_chat_answers_keeps_history_and_resets(model_dirs, draft_dir, engine):
    script = "Tell me about the lighthouse.\n/stats\nAnd the keeper?\n/reset\nAnd the keeper?\n/quit\nnever read\n"
    result = subprocess.run(chat_command(model_dirs, draft_dir, "--system", "Be brief."), input=script,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with_history = expected_answers(engine, ["Tell me about the lighthouse.", "And the keeper?"], system="Be brief.")
    fresh = expected_answers(engine, ["And the keeper?"], system="Be brief.")
    # The second answer saw the first turn; after /reset the same question is answered without it.
    assert result.stdout == "".join(answer + "\n" for answer in [*with_history, fresh[0]])
    assert with_history[1] != fresh[0]  # so history really made a difference here
    assert "[conversation cleared]" in result.stderr
    assert result.stderr.count("tok/s") >= 4  # three answers and /stats
    assert "peak memory" in result.stderr and "acceptance" in result.stderr
    assert "reused)" in result.stderr  # the second turn reused the KV of the first


def test_chat_in_a_pseudo_terminal_streams_and_quits(model_dirs, draft_dir, engine):
    pid, fd = pty.fork()
    if pid == 0:  # child: the REPL on a terminal
        os.execv(sys.executable, chat_command(model_dirs, draft_dir))
    output = b""

    def read_until(marker: bytes, timeout: float = 120) -> bytes:
        nonlocal output
        deadline = time.time() + timeout
        while marker not in output and time.time() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    output += os.read(fd, 4096)
                except OSError:
                    break
        return output

    try:
        read_until(b">>> ")
        os.write(fd, b"Hello there\n")
        read_until(b"tok/s")
        read_until(b">>> ", timeout=30)
        os.write(fd, b"/quit\n")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    text = output.decode(errors="replace")
    assert "sts-edge chat" in text
    expected = expected_answers(engine, ["Hello there"])[0]
    assert expected.strip() and expected.strip()[:5] in text.replace("\r", "")
    assert os.WEXITSTATUS(status) == 0


def test_list_models_shows_aliases_and_the_demo_pair():
    listed = subprocess.run([sys.executable, "-m", "sts_edge.chat", "--list-models"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "llama-8b" in listed.stdout and "meta-llama/Llama-3.1-8B-Instruct" in listed.stdout
    assert "qwen-coder-1.5b" in listed.stdout and "qwen-coder-0.5b" in listed.stdout


def test_ctrl_c_stops_the_answer_not_the_chat(engine):
    """A KeyboardInterrupt mid-answer ends that answer; the next question is still answered."""
    from sts_edge.chat import run_chat

    real_stream = engine.stream
    calls = []

    def interrupted_once(history, **options):
        calls.append([m["content"] for m in history])
        for i, piece in enumerate(real_stream(history, **options)):
            if len(calls) == 1 and i == 2:
                raise KeyboardInterrupt
            yield piece

    written, notes = [], []
    engine.stream = interrupted_once
    try:
        run_chat(engine, ["first question", "second question"], {"max_tokens": ANSWER_TOKENS}, None,
                 write=written.append, note=notes.append)
    finally:
        del engine.stream
    assert any("[stopped]" in n for n in notes)
    assert len(calls) == 2 and calls[1][0] == "first question" and calls[1][-1] == "second question"
    assert sum("tok/s" in n for n in notes) == 2
    assert engine.generate("hello", max_tokens=2).tokens  # the engine is free again
