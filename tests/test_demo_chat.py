"""The demo pair through `python -m sts_edge.chat` with no model flags, as a new user runs it first.

A module of its own: the subprocess loads the pair, and no fixture of another module may hold a
second copy of it in this process meanwhile (module-scoped fixtures are released when their
module ends), so the suite's peak memory stays one loaded pair.
"""

import subprocess
import sys

from fixtures.demo import needs_demo


@needs_demo
def test_chat_with_no_model_flags_runs_the_demo_pair():
    # bfloat16 keeps the suite's peak memory down; the default float32 path is the same code.
    result = subprocess.run([sys.executable, "-m", "sts_edge.chat", "--max-tokens", "24", "--backend", "torch-cpu",
                             "--dtype", "bfloat16"],
                            input="Write a Python function that returns the square of a number.\n",
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "def" in result.stdout
    assert "acceptance" in result.stderr
