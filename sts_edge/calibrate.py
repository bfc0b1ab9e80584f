"""Calibration: which draft layer and head best predict each target layer and head.

    python -m sts_edge.calibrate --model TARGET_DIR --draft DRAFT_DIR

Both models read a calibration text (a shipped default: prose and code). At evenly spaced
points, a short block of the text is run through both: the target's dense attention mass over the
context and the draft's scores (as in a speculative round) give top-k token sets; the Jaccard
overlap of every (target layer, unit) with every (draft layer, unit) is averaged over the points.
The head map takes the best draft unit in the mapped draft layer; with --layer-map calibrated,
the layer map is the monotone map that maximises the overlap. The result is a small JSON file
keyed by both models' identities, which `sts_edge.load` picks up by itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from importlib import resources
from pathlib import Path

import numpy as np

from sts_edge.cli import HelpFormatter
from sts_edge.config import ModelConfig
from sts_edge.errors import StsEdgeError
from sts_edge.mask import GRANULARITIES, LayerHeadMap, group_attention, units
from sts_edge.weights import checkpoint_files

FORMAT = "sts-edge-calibration"
VERSION = 1


class CalibrationError(StsEdgeError):
    """A calibration file that is corrupt, or made for other models."""


def default_text() -> str:
    return resources.files("sts_edge").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def model_identity(model_dir: str | Path) -> str:
    """A short fingerprint of a model: its config and the size and head of each weight file.

    Cheap on multi-GB checkpoints, and different for different weights of one architecture.
    """
    digest = hashlib.sha256((Path(model_dir) / "config.json").read_bytes())
    for path in checkpoint_files(model_dir):
        digest.update(path.name.encode())
        digest.update(str(path.stat().st_size).encode())
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, path.stat().st_size - (1 << 20)))
            digest.update(f.read())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("STS_EDGE_CACHE", Path.home() / ".cache" / "sts-edge")) / "calibration"


def default_path(target_dir: str | Path, draft_dir: str | Path) -> Path:
    return cache_dir() / f"{model_identity(target_dir)}__{model_identity(draft_dir)}.json"


class _TargetProbe:
    """Stands in for a VerificationMask: keeps every layer dense and records its attention mass."""

    needs_queries = True

    def __init__(self, context: int, granularity: str):
        self.context, self.granularity = context, granularity
        self.mass: dict[int, np.ndarray] = {}

    def sets_for(self, layer: int, q: np.ndarray, keys: np.ndarray) -> None:
        self.mass[layer] = group_attention(q, keys, self.context, self.granularity)
        return None


def _top_k_membership(scores: np.ndarray, k: int) -> np.ndarray:
    """[rows, context] scores -> [rows, context] float 0/1 membership of each row's top k."""
    member = np.zeros(scores.shape, dtype=np.float64)
    np.put_along_axis(member, np.argpartition(-scores, k - 1, axis=-1)[:, :k], 1.0, axis=-1)
    return member


def monotone_layer_map(layer_scores: np.ndarray) -> np.ndarray:
    """The non-decreasing map t -> l maximising sum_t layer_scores[t, l] (dynamic programming)."""
    n_target, n_draft = layer_scores.shape
    best = np.zeros_like(layer_scores)
    best[0] = layer_scores[0]
    for t in range(1, n_target):
        best[t] = layer_scores[t] + np.maximum.accumulate(best[t - 1])
    layer_map = np.zeros(n_target, dtype=np.int64)
    layer_map[-1] = int(best[-1].argmax())
    for t in range(n_target - 2, -1, -1):
        layer_map[t] = int(best[t, : layer_map[t + 1] + 1].argmax())
    return layer_map


def calibrate(
    target,
    draft,
    tokens: list[int],
    *,
    top_k: int = 64,
    probes: int = 8,
    block: int = 5,
    calibrate_layers: bool = False,
    progress: bool = False,
) -> dict:
    """Layer and head maps for both granularities, from `tokens` run through both models."""
    first = max(top_k * 2, len(tokens) // (probes + 1))
    points = [int(p) for p in np.linspace(first, len(tokens) - block, probes)]
    if len(tokens) < first + block:
        raise ValueError(f"the calibration text has {len(tokens)} tokens; need at least {first + block} for top_k={top_k}")
    t_cfg, d_cfg = target.config, draft.config
    result: dict = {"layer_map": {}, "head_map": {}, "jaccard": {}}
    for granularity in GRANULARITIES:
        t_units, d_units = units(t_cfg, granularity), units(d_cfg, granularity)
        overlap = np.zeros((t_cfg.num_hidden_layers, t_units, d_cfg.num_hidden_layers, d_units))
        target.rollback(0)
        draft.rollback(0)
        iterator = points
        if progress:
            from tqdm import tqdm

            iterator = tqdm(points, desc=f"calibrating ({granularity} heads)", unit="probe")
        for point in iterator:
            for model in (target, draft):  # extend both caches to the probe point
                for start in range(model.length, point, 512):
                    model.forward(tokens[start : min(point, start + 512)])
            piece = tokens[point : point + block]
            probe = _TargetProbe(point, granularity)
            target.forward(piece, all_logits=True, mask=probe)
            draft.start_scores(granularity, "max")
            draft.forward(piece)
            draft_scores = draft.read_scores(point)
            target.rollback(point)
            draft.rollback(point)
            k = min(top_k, point)
            t_member = _top_k_membership(np.concatenate([probe.mass[i] for i in range(t_cfg.num_hidden_layers)]), k)
            d_member = _top_k_membership(draft_scores.reshape(-1, point), k)
            inter = t_member @ d_member.T
            overlap += (inter / (2 * k - inter)).reshape(overlap.shape)
        overlap /= len(points)
        if calibrate_layers:
            layer_map = monotone_layer_map(overlap.max(axis=3).mean(axis=1))
        else:
            layer_map = LayerHeadMap.proportional(t_cfg, d_cfg, granularity).layer_map
        per_layer = overlap[np.arange(t_cfg.num_hidden_layers), :, layer_map]  # [L_t, t_units, d_units]
        head_map = per_layer.argmax(axis=-1)
        result["layer_map"][granularity] = layer_map.tolist()
        result["head_map"][granularity] = head_map.tolist()
        result["jaccard"][granularity] = float(per_layer.max(axis=-1).mean())
    return result


def save(path: Path, maps: dict, target_dir: str | Path, draft_dir: str | Path, target_cfg: ModelConfig, draft_cfg: ModelConfig, **info) -> Path:
    record = {
        "format": FORMAT,
        "version": VERSION,
        "target": {"identity": model_identity(target_dir), "path": str(target_dir), "layers": target_cfg.num_hidden_layers,
                   "kv_heads": target_cfg.num_key_value_heads, "heads": target_cfg.num_attention_heads},
        "draft": {"identity": model_identity(draft_dir), "path": str(draft_dir), "layers": draft_cfg.num_hidden_layers,
                  "kv_heads": draft_cfg.num_key_value_heads, "heads": draft_cfg.num_attention_heads},
        **info,
        **maps,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)  # never leave a half-written file where the runtime looks
    return path


def load_mapping(path: str | Path, target_dir: str | Path, draft_dir: str | Path, target_cfg: ModelConfig,
                 draft_cfg: ModelConfig, granularity: str) -> LayerHeadMap:
    """Read and check a calibration file; any doubt is an error, never a silent fallback."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
        if record.get("format") != FORMAT or record.get("version") != VERSION:
            raise CalibrationError(f"{path} is not an sts-edge calibration file (version {VERSION})")
        for role, model_dir in (("target", target_dir), ("draft", draft_dir)):
            if record[role]["identity"] != model_identity(model_dir):
                raise CalibrationError(
                    f"{path} was calibrated for another {role} ({record[role]['path']}), not {model_dir}; "
                    "rerun python -m sts_edge.calibrate for this pair"
                )
        layer_map = np.asarray(record["layer_map"][granularity], dtype=np.int64)
        head_map = np.asarray(record["head_map"][granularity], dtype=np.int64)
    except CalibrationError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CalibrationError(f"{path} is corrupt ({type(err).__name__}: {err}); delete it or rerun calibration") from None
    t_units, d_units = units(target_cfg, granularity), units(draft_cfg, granularity)
    valid = (
        layer_map.shape == (target_cfg.num_hidden_layers,)
        and head_map.shape == (target_cfg.num_hidden_layers, t_units)
        and layer_map.min() >= 0 and layer_map.max() < draft_cfg.num_hidden_layers
        and head_map.min() >= 0 and head_map.max() < d_units
    )
    if not valid:
        raise CalibrationError(f"{path} has maps that do not fit these models; rerun python -m sts_edge.calibrate")
    return LayerHeadMap(layer_map, head_map)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sts_edge.calibrate",
        description="Measure which draft layer/head best predicts each target layer/head's attention, and save "
        "the maps where sts_edge.load finds them (keyed by both models' identities).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", required=True, help="target model directory")
    parser.add_argument("--draft", required=True, help="draft model directory")
    parser.add_argument("--text", help="calibration text file (default: the shipped prose + code sample)")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens to use at most")
    parser.add_argument("--top-k", type=int, default=64, help="size of the token sets compared by Jaccard overlap")
    parser.add_argument("--probes", type=int, default=8, help="points in the text where sets are compared")
    parser.add_argument("--layer-map", choices=["proportional", "calibrated"], default="proportional",
                        help="keep f(t) = floor(t * L_d / L_t), or fit the best monotone layer map")
    parser.add_argument("--out", help="output JSON (default: the per-pair file in the sts-edge cache)")
    parser.add_argument("--backend", default="auto", help="compute backend")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sts_edge.api import load
    from sts_edge.models import resolve_model

    try:
        # Aliases and hub ids name directories: the saved file records (and is keyed by) those.
        args.model, args.draft = resolve_model(args.model), resolve_model(args.draft)
        engine = load(args.model, args.draft, backend=args.backend, max_seq_len=args.tokens + 16, calibration=None)
        text = Path(args.text).read_text(encoding="utf-8", errors="replace") if args.text else default_text()
        tokens = engine.tokenizer.encode(text)[: args.tokens]
        maps = calibrate(engine.target, engine.draft, tokens, top_k=args.top_k, probes=args.probes,
                         calibrate_layers=args.layer_map == "calibrated", progress=True)
        out = Path(args.out) if args.out else default_path(args.model, args.draft)
        save(out, maps, args.model, args.draft, engine.target.config, engine.draft.config,
             tokens=len(tokens), top_k=args.top_k, probes=args.probes, layer_map_source=args.layer_map)
    except (StsEdgeError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    for granularity in GRANULARITIES:
        print(f"  {granularity} heads: mean best Jaccard {maps['jaccard'][granularity]:.3f}, layer map {maps['layer_map'][granularity]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
