"""The quantized safetensors format both backends load: mlx-lm's affine group quantization.

A quantized linear (or embedding) `X` is stored as `X.weight` (uint32, values packed from the
least significant bit, [out, in * bits / 32]), `X.scales` and `X.biases` ([out, in / group_size],
model dtype), and a value decodes as scale * q + bias. config.json's `quantization` block holds
the default `group_size` and `bits`, and may override them per module path. MLX runs such layers
natively (QuantizedLinear); the PyTorch backend decodes them at load time with `dequantize`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sts_edge.errors import ModelLoadError


def module_settings(config_raw: dict[str, Any], module: str) -> tuple[int, int] | None:
    """(group_size, bits) for a module path such as `layers.0.self_attn.q_proj`, or None when the
    checkpoint has no quantization block. Per-module overrides may be keyed with or without the
    leading `model.` of the checkpoint names."""
    block = config_raw.get("quantization")
    if not block:
        return None
    if block.get("mode", "affine") != "affine":
        raise ModelLoadError(f"quantization mode {block['mode']!r} is not supported (supported: affine, mlx-lm's default)")
    override = block.get(module, block.get(f"model.{module}"))
    if isinstance(override, dict):
        return int(override["group_size"]), int(override["bits"])
    return int(block["group_size"]), int(block["bits"])


def dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int, bits: int) -> np.ndarray:
    """Decode [out, in * bits / 32] uint32 words into float32 [out, in]."""
    if packed.dtype != np.uint32:
        raise ModelLoadError(f"quantized weights must be uint32, got {packed.dtype}")
    out = packed.shape[0]
    columns = packed.shape[1] * 32 // bits
    if scales.shape != (out, columns // group_size) or biases.shape != scales.shape:
        raise ModelLoadError(
            f"quantized weight {packed.shape} with {bits} bits and groups of {group_size} does not fit scales {scales.shape}"
        )
    # The words form one little-endian bit stream; every `bits` consecutive bits are one value.
    stream = np.unpackbits(np.ascontiguousarray(packed).view(np.uint8), axis=-1, bitorder="little")
    values = stream.reshape(out, columns, bits).astype(np.uint32) @ (np.uint32(1) << np.arange(bits, dtype=np.uint32))
    grouped = values.reshape(out, columns // group_size, group_size).astype(np.float32)
    return (grouped * scales[..., None].astype(np.float32) + biases[..., None].astype(np.float32)).reshape(out, columns)
