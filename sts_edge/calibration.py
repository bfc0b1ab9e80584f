"""Calibration: which draft layer and head best predict each target layer and head.

Both models read a calibration text (a shipped default: prose and code). At evenly spaced
points, a short block of the text is run through both: the target's dense attention mass over the
context and the draft's scores (as a speculative round collects them: the max of its queries'
attention) give top-k token sets; the Jaccard overlap of every (target layer, unit) with every
(draft layer, unit) is averaged over the points. The head map takes the best draft unit in the
mapped draft layer; optionally the layer map is the monotone map that maximises the overlap. The
result is a small JSON file keyed by both models' identities, which `sts_edge.load` picks up by
itself. The command is `python -m sts_edge.calibrate`.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import numpy as np

from sts_edge.backend import CausalLM
from sts_edge.config import ModelConfig
from sts_edge.errors import StsEdgeError
from sts_edge.mask import GRANULARITIES, LayerHeadMap, draft_scores, group_attention, units
from sts_edge.paths import cache_root
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
    return cache_root() / "calibration"


def default_path(target_dir: str | Path, draft_dir: str | Path) -> Path:
    return cache_dir() / f"{model_identity(target_dir)}__{model_identity(draft_dir)}.json"


class AttentionObserver:
    """Records, layer by layer, what a forward's queries attend to: the target's dense attention mass
    (summed over queries), or the draft's scores as a round collects them (the max over queries)."""

    def __init__(self, context: int, granularity: str, draft: bool):
        self.context, self.granularity, self.draft = context, granularity, draft
        self.per_layer: dict[int, np.ndarray] = {}

    def observe(self, layer: int, q: np.ndarray, keys: np.ndarray) -> None:
        if self.draft:
            self.per_layer[layer] = draft_scores(q, keys, self.context, self.granularity, "max")[:, : self.context]
        else:
            self.per_layer[layer] = group_attention(q, keys, self.context, self.granularity)

    def stacked(self) -> np.ndarray:
        """[layers * units, context]."""
        return np.concatenate([self.per_layer[layer] for layer in sorted(self.per_layer)])


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
    target: CausalLM,
    draft: CausalLM,
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
                if model.length < point:
                    model.prefill(tokens[model.length : point])
            piece = tokens[point : point + block]
            target_mass = AttentionObserver(point, granularity, draft=False)
            draft_mass = AttentionObserver(point, granularity, draft=True)
            target.verify(piece, observer=target_mass)
            draft.verify(piece, observer=draft_mass)
            target.rollback(point)
            draft.rollback(point)
            k = min(top_k, point)
            t_member = _top_k_membership(target_mass.stacked(), k)
            d_member = _top_k_membership(draft_mass.stacked(), k)
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
