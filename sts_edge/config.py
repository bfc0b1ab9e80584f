"""Model configuration, read from a Hugging Face config.json.

One dataclass covers the Llama family as this project supports it: Llama 3.x (with llama3 rope
scaling), Mistral and SmolLM2 (plain Llama), Qwen2/Qwen2.5 (q/k/v biases) and Qwen3 (q/k RMSNorm).
The architectures differ only in these switches, so the backends need one model file each.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sts_edge.errors import ModelLoadError

# model_type in config.json -> (q/k/v projections carry a bias, q and k are RMS-normalised per head)
SUPPORTED_ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (True, False),
    "qwen3": (False, True),
}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    rope_scaling: dict[str, Any] | None = None
    torch_dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def o_proj_bias(self) -> bool:
        """Qwen2 biases q/k/v only; Llama and Qwen3 with attention_bias bias all four projections."""
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def gqa_group(self) -> int:
        """Query heads that share one KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{source}: model_type {model_type!r} is not supported. Supported: "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))} (Llama 3.x, SmolLM2, Mistral, Qwen2/2.5, Qwen3)."
            )
        has_bias, qk_norm = SUPPORTED_ARCHITECTURES[model_type]
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            kv_heads = int(raw.get("num_key_value_heads") or heads)
            # transformers 5 moved rope settings into rope_parameters; Hub checkpoints still use
            # the classic rope_theta / rope_scaling keys. Read either.
            rope_params = raw.get("rope_parameters") or {}
            rope_theta = float(raw.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
            rope_scaling = raw.get("rope_scaling") or (
                rope_params if rope_params.get("rope_type", "default") != "default" else None
            )
            config = cls(
                model_type=model_type,
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=int(raw.get("head_dim") or hidden // heads),
                vocab_size=int(raw["vocab_size"]),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", has_bias)),
                qk_norm=qk_norm,
                rope_scaling=rope_scaling,
                torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
                extra=raw,
            )
        except KeyError as missing:
            raise ModelLoadError(f"{source}: required key {missing} is missing") from None
        if heads % kv_heads:
            raise ModelLoadError(f"{source}: {heads} attention heads are not a multiple of {kv_heads} KV heads")
        if raw.get("use_sliding_window"):
            raise ModelLoadError(f"{source}: sliding-window attention is not supported")
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise ModelLoadError(f"{source}: rope_scaling type {kind!r} is not supported (supported: llama3)")
        return config

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            raise ModelLoadError(f"model directory {model_dir} does not exist")
        if not path.is_file():
            raise ModelLoadError(f"{model_dir}: no config.json here; is this a Hugging Face model directory?")
        return cls.from_dict(json.loads(path.read_text()), source=str(path))

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse rotary frequencies [head_dim // 2], float64, with llama3 scaling applied."""
        inv_freq = 1.0 / self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        scaling = self.rope_scaling
        if not scaling or scaling.get("rope_type", scaling.get("type")) != "llama3":
            return inv_freq
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
        high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
        original_len = float(scaling.get("original_max_position_embeddings", 8192))
        low_freq_wavelen = original_len / low_freq_factor
        high_freq_wavelen = original_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (original_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(medium, blended, scaled)
