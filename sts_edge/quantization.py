"""The quantized safetensors format both backends load: mlx-lm's affine group quantization.

A quantized linear (or embedding) `X` is stored as `X.weight` (uint32, values packed from the
least significant bit, [out, in * bits / 32]), `X.scales` and `X.biases` ([out, in / group_size],
model dtype), and a value decodes as scale * q + bias. config.json's `quantization` block holds
the default `group_size` and `bits`, and may override them per module path. MLX runs such layers
natively (QuantizedLinear); on a GPU the PyTorch backend runs them packed through its Triton
kernel; the PyTorch CPU path decodes them at load time with `dequantize`.

`quantize` is MLX's own affine rule (tests compare it with mx.quantize): per group, the edge of
larger magnitude (the minimum or the maximum) is represented exactly and the step is adjusted so
that it is a whole number of steps from zero.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    if 32 % bits == 0:  # whole values per word: shift each to the bottom
        shifts = np.arange(0, 32, bits, dtype=np.uint32)
        values = ((packed[:, :, None] >> shifts) & np.uint32(2**bits - 1)).reshape(out, columns)
    else:  # the words form one little-endian bit stream; every `bits` consecutive bits are one value
        stream = np.unpackbits(np.ascontiguousarray(packed).view(np.uint8), axis=-1, bitorder="little")
        values = stream.reshape(out, columns, bits).astype(np.uint32) @ (np.uint32(1) << np.arange(bits, dtype=np.uint32))
    grouped = values.reshape(out, columns // group_size, group_size).astype(np.float32)
    return (grouped * scales[..., None].astype(np.float32) + biases[..., None].astype(np.float32)).reshape(out, columns)


BITS = (4, 8)  # what `python -m sts_edge.convert --quantize` writes (the GPU kernel reads these)
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Quantization:
    """How a conversion quantizes: bits per weight, inputs per group, and whether the embedding
    table and LM head stay in floating point."""

    bits: int = 4
    group_size: int = 64
    keep_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ModelLoadError(f"--quantize takes {' or '.join(map(str, BITS))} bits, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise ModelLoadError(f"--group-size takes {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}")

    def config(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}


# Values quantized per block of rows: numpy's temporaries are several times a block's size (an
# embedding table whole would take gigabytes), and rows are independent.
BLOCK_VALUES = 1 << 22


def quantize(weight: np.ndarray, group_size: int, bits: int, dtype: str | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed uint32 [out, in * bits / 32], scales [out, in / group_size], biases) of float weight
    [out, in], the scales and biases as float32. With `dtype` ("bfloat16" or "float16": how they will
    be stored), they are rounded to it first and the values chosen against the rounded ones, so the
    stored triple decodes as closely as it can."""
    out, columns = weight.shape
    if columns % group_size:
        raise ModelLoadError(f"a weight of {columns} inputs is not a whole number of groups of {group_size}")
    rows = max(1, BLOCK_VALUES // columns)
    blocks = [quantize_rows(weight[first : first + rows], group_size, bits, dtype) for first in range(0, out, rows)]
    return tuple(np.concatenate(parts) for parts in zip(*blocks))


def quantize_rows(weight: np.ndarray, group_size: int, bits: int, dtype: str | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`quantize` of a block of rows."""
    out, columns = weight.shape
    groups = weight.reshape(out, columns // group_size, group_size).astype(np.float32)
    n_bins = np.float32(2**bits - 1)
    w_max, w_min = groups.max(axis=-1), groups.min(axis=-1)
    low_edge = np.abs(w_min) > np.abs(w_max)
    scales = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7))
    scales = np.where(low_edge, scales, -scales)
    edge = np.where(low_edge, w_min, w_max)
    steps = np.rint(edge / scales)
    scales = np.where(steps != 0, edge / np.where(steps != 0, steps, 1), scales).astype(np.float32)
    biases = np.where(steps == 0, np.float32(0), edge).astype(np.float32)
    if dtype is not None:
        scales, biases = round_to(scales, dtype), round_to(biases, dtype)
    values = np.clip(np.rint((groups - biases[..., None]) / scales[..., None]), 0, n_bins).astype(np.uint32)
    return pack(values.reshape(out, columns), bits), scales, biases


def round_to(array: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to "bfloat16" or "float16" (returned as float32)."""
    if dtype == "float16":
        return array.astype(np.float16).astype(np.float32)
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).view(np.float32)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Values [out, n] (< 2^bits) into uint32 words [out, n * bits / 32], least significant bits first:
    one little-endian bit stream, as `dequantize` reads it."""
    out, n = values.shape
    if 32 % bits == 0:  # whole values per word: shift each into place (`dequantize`'s inverse)
        shifts = np.arange(0, 32, bits, dtype=np.uint32)
        return np.bitwise_or.reduce(values.reshape(out, n * bits // 32, 32 // bits) << shifts, axis=-1)
    stream = ((values[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8).reshape(out, n * bits)
    return np.packbits(stream, axis=-1, bitorder="little").view(np.uint32)
