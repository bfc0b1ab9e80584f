"""Quality of sparse verification: every policy and budget against the dense target, on one text.

    python scripts/eval_quality.py --model TARGET_DIR --draft DRAFT_DIR --text book.txt \
        --context 4096 --eval-tokens 512 --budgets 256,512,1024,10% --out results/quality.json

The text is read teacher-forced. Both models prefill its first --context tokens once; then, block
by block (gamma + 1 tokens, as one verification pass), the draft reads the block collecting its
attention scores, and the target verifies it once dense and once per (policy, budget). Per policy
and budget it reports:

- recall: share of the dense target's attention mass at the block's queries (summed over layers,
  heads and queries, context positions only) that falls inside the chosen sets; `recall_vs_oracle`
  divides by the oracle's recall at the same budget (the oracle maximises this mass, so 1.0 is the
  ceiling). Sets are evaluated on the dense pass's own queries, so all policies face the same ones.
- top1 agreement and KL(dense || sparse) of the next-token distributions;
- perplexity of the text's true next tokens under the sparse target;
- acceptance: greedy acceptance of the draft's own predictions (teacher-forced: the leading run
  of positions where the draft's argmax equals the sparse target's argmax, over gamma); with
  --drafting sparse the draft's steps after a block's first read its own sets (--draft-budget),
  which changes its predictions and, since only the first step then scores, sts's sets;
- sparsity: share of context rows the sparse passes skipped.

Caveat: the context's KV cache comes from dense passes; in real STS generation, tokens verified
earlier were themselves verified sparsely. Writes JSON and a PNG plot beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np

from sts_edge.api import load
from sts_edge.backend import ScoreSpec
from sts_edge.sampling import GREEDY
from sts_edge.cli import parse_budget
from sts_edge.mask import (
    POLICIES,
    LayerHeadMap,
    MaskPolicy,
    VerificationPlan,
    attention_recall,
    group_attention,
    reference_sets,
)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class RecallProbe:
    """Observes a dense verification pass and measures, per layer, how much of its attention mass the
    sets of each plan hold, with the sets chosen by the selection contract's numpy reference on this
    pass's own queries and keys (so every policy faces the same ones, and the oracle is the bound)."""

    def __init__(self, context: int, plans: dict[tuple, tuple[VerificationPlan, np.ndarray | None]], heads: int,
                 kv_heads: int):
        self.context, self.plans, self.heads, self.kv_heads = context, plans, heads, kv_heads
        self.inside = dict.fromkeys(plans, 0.0)
        self.total = dict.fromkeys(plans, 0.0)

    def observe(self, layer: int, q: np.ndarray, keys: np.ndarray) -> None:
        mass = {}
        for key, (plan, scores) in self.plans.items():
            granularity = plan.policy.granularity
            if granularity not in mass:
                mass[granularity] = group_attention(q, keys, self.context, granularity)
            count = self.kv_heads if granularity == "kv" else self.heads
            sets = reference_sets(plan, layer, self.context, count, q, keys, scores)
            inside, total = attention_recall(mass[granularity], sets)
            self.inside[key] += inside
            self.total[key] += total


def budget_label(budget: float) -> str:
    return f"{budget:.0%}" if budget < 1 else str(int(budget))


def evaluate(engine, tokens: list[int], context: int, eval_tokens: int, gamma: int, policies: list[MaskPolicy],
             progress: bool = True, labels: list[str] | None = None,
             mappings: list[dict[str, LayerHeadMap] | None] | None = None,
             drafting: MaskPolicy | None = None) -> list[dict]:
    """Rows of metrics per policy. `labels` name the rows (default: the policy names); `mappings`
    give a policy its own layer/head maps by granularity (default: the engine's calibration, else
    proportional), so calibrated and uncalibrated sts can be compared in one pass. `drafting`: an
    sts policy with drafting "sparse" whose sets the draft's later steps read (default: dense)."""
    target, draft = engine.target, engine.draft
    if context + eval_tokens + 1 > len(tokens):
        raise ValueError(f"the text has {len(tokens)} tokens; need context + eval tokens + 1 = {context + eval_tokens + 1}")
    block_len = gamma + 1
    labels = labels or [p.name for p in policies]
    keys = [(label, budget_label(p.budget), p.granularity) for label, p in zip(labels, policies)]
    default_map = {g: engine.calibration.get(g) or LayerHeadMap.proportional(target.config, draft.config, g) for g in ("kv", "query")}
    policy_maps = [(m or default_map) for m in (mappings or [None] * len(policies))]
    granularities = {p.granularity for p in policies}
    sums = {k: dict(nll=0.0, kl=0.0, top1=0, positions=0, accepted=0, drafted=0, inside=0.0, total=0.0, kept=0, dense=0) for k in keys}
    dense_nll, dense_positions = 0.0, 0

    for model in (target, draft):
        model.rollback(0)
        model.prefill(tokens[:context])
    starts = range(context, context + eval_tokens - block_len + 1, block_len)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="evaluating", unit="block")
    layers = target.config.num_hidden_layers
    draft_plan = VerificationPlan(drafting, LayerHeadMap.proportional(target.config, draft.config, "kv")).for_draft(
        draft.config) if drafting is not None else None
    for p in starts:
        block, truth = tokens[p : p + block_len], np.array(tokens[p + 1 : p + block_len + 1])
        # Draft: catch up to the block and read it, teacher-forced, collecting scores as in a round.
        pending = tokens[draft.length : p + 1]
        proposal = draft.draft(pending, gamma, GREEDY, None, scores=ScoreSpec("kv", "max"), forced=block[1:],
                               sparse_steps=draft_plan)
        draft_choice = np.array(proposal.probs.argmax())
        draft_scores = {"kv": proposal.scores}
        if "query" in granularities:
            draft.rollback(p)
            draft_scores["query"] = draft.draft(block[:1], gamma, GREEDY, None, scores=ScoreSpec("query", "max"),
                                                forced=block[1:]).scores

        plans = {}
        for key, policy, mapping in zip(keys, policies, policy_maps):
            if policy.name != "dense":
                plans[key] = VerificationPlan(policy, mapping[policy.granularity] if policy.name == "sts" else None)
        # Sparse passes first (each rolled back), then the dense pass that also measures recall
        # and leaves the block in the cache for the next one.
        sparse_logits = {}
        for key, plan in plans.items():
            sparse_logits[key] = target.verify(block, GREEDY, plan, draft_scores[plan.policy.granularity]).logits()
            target.rollback(p)
        probe = RecallProbe(p, {k: (plan, draft_scores[plan.policy.granularity].numpy(p)) for k, plan in plans.items()},
                            target.config.num_attention_heads, target.config.num_key_value_heads)
        dense = target.verify(block, observer=probe).logits()
        dense_logp = log_softmax(dense.astype(np.float64))
        dense_nll -= dense_logp[np.arange(block_len), truth].sum()
        dense_positions += block_len

        for key in keys:
            s = sums[key]
            logits = sparse_logits.get(key, dense)
            logp = log_softmax(logits.astype(np.float64))
            s["nll"] -= logp[np.arange(block_len), truth].sum()
            s["kl"] += (np.exp(dense_logp) * (dense_logp - logp)).sum()
            s["top1"] += int((logits.argmax(-1) == dense.argmax(-1)).sum())
            s["positions"] += block_len
            agree = draft_choice == logits[:gamma].argmax(-1)
            s["accepted"] += int(np.cumprod(agree).sum())
            s["drafted"] += gamma
            if key in plans:
                s["inside"] += probe.inside[key]
                s["total"] += probe.total[key]
                kept, dense_rows = plans[key].policy.rows_read(p, layers)
                s["kept"] += kept
                s["dense"] += dense_rows

    results = []
    oracle_recall = {}
    for key, policy in zip(keys, policies):
        s = sums[key]
        recall = s["inside"] / s["total"] if s["total"] else 1.0
        if policy.name == "oracle":
            oracle_recall[key[1:]] = recall
        results.append({
            "policy": key[0], "budget": key[1], "budget_tokens": policy.budget_tokens(context), "sink": policy.sink,
            "window": policy.window, "granularity": policy.granularity,
            "recall": recall,
            "top1_agreement": s["top1"] / s["positions"],
            "kl": s["kl"] / s["positions"],
            "perplexity": float(np.exp(s["nll"] / s["positions"])),
            "acceptance": s["accepted"] / s["drafted"],
            "sparsity": 1 - s["kept"] / s["dense"] if s["dense"] else 0.0,
        })
    for row in results:
        oracle = oracle_recall.get((row["budget"], row["granularity"]))
        row["recall_vs_oracle"] = row["recall"] / oracle if oracle else None
    results.append({"policy": "dense-reference", "perplexity": float(np.exp(dense_nll / dense_positions))})
    return results


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["policy"] not in ("dense", "dense-reference")]
    # Budgets sit at their token counts (fractions resolved at the evaluated context), on a log axis.
    ticks = {r["budget_tokens"]: r["budget"] for r in rows}
    fig, (ax_recall, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4.2))
    both = len({r["granularity"] for r in rows}) > 1
    for name, granularity in dict.fromkeys((r["policy"], r["granularity"]) for r in rows):
        mine = sorted((r for r in rows if (r["policy"], r["granularity"]) == (name, granularity)), key=lambda r: r["budget_tokens"])
        xs = [r["budget_tokens"] for r in mine]
        label = f"{name} ({granularity} sets)" if both else name
        style = "--" if both and granularity == "query" else "-"
        ax_recall.plot(xs, [r["recall"] for r in mine], marker="o", linestyle=style, label=label)
        ax_ppl.plot(xs, [r["perplexity"] for r in mine], marker="o", linestyle=style, label=label)
    dense_ppl = next(r["perplexity"] for r in results if r["policy"] == "dense-reference")
    ax_ppl.axhline(dense_ppl, color="black", linestyle="--", linewidth=1, label="dense")
    for ax, label in ((ax_recall, "attention mass recall"), (ax_ppl, "perplexity")):
        ax.set_xscale("log")
        ax.set_xticks(list(ticks), [f"{label_} ({tokens})" if label_.endswith("%") else label_ for tokens, label_ in ticks.items()])
        ax.minorticks_off()
        ax.set_xlabel("budget: scored tokens per set (plus sink and window)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="target model directory")
    parser.add_argument("--draft", required=True, help="draft model directory")
    parser.add_argument("--text", required=True, help="a long UTF-8 or Latin-1 text file")
    parser.add_argument("--context", type=int, default=4096, help="tokens of the text read before evaluation starts")
    parser.add_argument("--eval-tokens", type=int, default=256, help="tokens evaluated after the context")
    parser.add_argument("--gamma", type=int, default=4, help="draft tokens per round (blocks of gamma + 1)")
    parser.add_argument("--policies", default="sts,oracle,streaming,quest", help=f"comma-separated, from {POLICIES}")
    parser.add_argument("--budgets", default="256,512,1024,10%", help="comma-separated token counts or fractions")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--granularity", default="kv", help="kv, query, or kv,query to compare one set per KV head with one per query head")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--calibration", default="auto", help="'auto', a file, or 'none'")
    parser.add_argument("--candidates", default="1,5",
                        help="sts's two-stage settings, comma separated (rows 'sts xK'): K > 1 nominates K x budget "
                        "tokens by the draft's scores and keeps the budget's best by the target's own attention")
    parser.add_argument("--draft-kv-bits", type=int, default=16, choices=(16, 8, 4),
                        help="the draft's KV cache precision (its scores, and so the sts sets, come from it)")
    parser.add_argument("--drafting", choices=("dense", "sparse"), default="dense",
                        help="sparse: the draft's steps after a block's first read its own sets (the cheaper drafting pass)")
    parser.add_argument("--draft-budget", type=int, default=512, help="with --drafting sparse, the draft's own sets' budget")
    parser.add_argument("--out", default="eval_quality.json", help="JSON output; the plot goes beside it as .png")
    args = parser.parse_args(argv)

    raw = Path(args.text).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = text.replace("\r\n", "\n")
    calibration = None if args.calibration == "none" else args.calibration
    engine = load(args.model, args.draft, backend=args.backend, max_seq_len=args.context + args.eval_tokens + 8, calibration=calibration,
                  draft_kv_bits=args.draft_kv_bits)
    tokens = engine.tokenizer.encode(text)
    budgets = [parse_budget(b) for b in args.budgets.split(",")]
    names = [n for n in args.policies.split(",") if n]
    if "oracle" not in names:
        names.append("oracle")  # the reference for recall_vs_oracle
    granularities = args.granularity.split(",")
    candidates = [int(k) for k in args.candidates.split(",")]
    rows = [(n if k == 1 else f"{n} x{k}", MaskPolicy(n, budget=b, sink=args.sink, window=args.window, granularity=g,
                                                      candidates=k))
            for g in granularities for n in names for k in (candidates if n == "sts" else [1]) for b in budgets
            if not (n == "dense" and g != granularities[0])]
    labels, policies = [label for label, _ in rows], [policy for _, policy in rows]
    drafting = MaskPolicy("sts", budget=args.draft_budget, sink=args.sink, window=args.window, drafting="sparse") \
        if args.drafting == "sparse" else None
    results = evaluate(engine, tokens, args.context, args.eval_tokens, args.gamma, policies, labels=labels,
                       drafting=drafting)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": datetime.date.today().isoformat(),
        "model": args.model, "draft": args.draft, "text": Path(args.text).name,
        "context": args.context, "eval_tokens": args.eval_tokens, "gamma": args.gamma, "draft_kv_bits": args.draft_kv_bits,
        "drafting": args.drafting, "draft_budget": args.draft_budget if drafting else None,
        "backend": engine.backend, "calibrated": bool(engine.calibration),
        "machine": platform.platform(), "versions": {p: version(p) for p in ("sts-edge", "numpy")},
        "results": results,
    }
    out.write_text(json.dumps(record, indent=1))
    plot(results, out.with_suffix(".png"), f"{Path(args.model).name} / draft {Path(args.draft).name}, {args.context} context")
    print(f"{'policy':<10} {'sets':>5} {'budget':>7} {'recall':>7} {'vs oracle':>9} {'top1':>6} {'KL':>8} {'ppl':>9} {'accept':>7} {'sparsity':>8}")
    for r in results:
        if r["policy"] == "dense-reference":
            print(f"dense perplexity {r['perplexity']:.3f}")
            continue
        vs = f"{r['recall_vs_oracle']:.3f}" if r["recall_vs_oracle"] is not None else "-"
        print(f"{r['policy']:<10} {r['granularity']:>5} {r['budget']:>7} {r['recall']:>7.3f} {vs:>9} {r['top1_agreement']:>6.3f} {r['kl']:>8.4f} "
              f"{r['perplexity']:>9.3f} {r['acceptance']:>7.3f} {r['sparsity']:>8.1%}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
