"""The benchmark's charts: decode tokens/s against context length (one line per system and mode), and
the speculative round split into the draft's steps and verification."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402


def measured(report: dict) -> list[dict]:
    return [row for row in report["results"] if "ttft_s" in row]


def plot(report: dict, out_dir: Path) -> list[Path]:
    """Write latency_decode.png and latency_rounds.png into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = measured(report)
    title = f"{report['models']['target']['name']} / {report['models']['draft']['name']} on {report['device']}"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system in dict.fromkeys(row["system"] for row in rows):
        mine = sorted((row for row in rows if row["system"] == system), key=lambda row: row["prompt_tokens"])
        projected = any("projected_decode_tok_s" in row for row in mine)
        rates = [row.get("projected_decode_tok_s") or row["decode_tok_s"] or 0.0 for row in mine]
        ax.plot([row["prompt_tokens"] for row in mine], rates, marker="o", linestyle="--" if projected else "-",
                label=system + (" (projected)" if projected else ""))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (prompt tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    decode = out_dir / "latency_decode.png"
    fig.tight_layout()
    fig.savefig(decode, dpi=120)
    plt.close(fig)

    rounds = [row for row in rows if "round" in row and row["system"].startswith("sts-edge")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = [f"{row['system'].partition(':')[2]}\n{row['prompt_tokens']}" for row in rounds]
    draft = [row["round"]["draft_ms"] for row in rounds]
    verify = [row["round"]["verify_ms"] for row in rounds]
    ax.bar(labels, draft, label="draft steps")
    ax.bar(labels, verify, bottom=draft, label="verification (selection included)")
    ax.set_ylabel("ms per round")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    split = out_dir / "latency_rounds.png"
    fig.tight_layout()
    fig.savefig(split, dpi=120)
    plt.close(fig)
    return [decode, split]
