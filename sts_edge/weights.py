"""Finding a model's safetensors files and mapping checkpoint tensor names, once, at load time.

The backends read the files with their own framework (torch or mlx); this module decides which
files to read and what each tensor is called inside our models, so both backends agree and the
model code never sees checkpoint naming quirks.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from sts_edge.config import ModelConfig
from sts_edge.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model directory: the shards named by the index, or the single file."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(
                f"{model_dir}: {INDEX_FILE} names shards that are not there: {', '.join(missing)}. "
                "The download is incomplete; fetch the model again."
            )
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{model_dir}: no *.safetensors weights found (PyTorch .bin checkpoints are not supported; "
            "convert them with transformers' save_pretrained(safe_serialization=True))."
        )
    return files


def tensor_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, read from the safetensors headers only (no weights are loaded)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in checkpoint_files(model_dir):
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for name, info in header.items():
            if name != "__metadata__":
                shapes[name] = tuple(info["shape"])
    return shapes


# safetensors dtype -> the numpy dtype its bytes are read as (bfloat16 as raw uint16: numpy has none)
RAW_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32, "I32": np.int32,
              "U8": np.uint8, "I64": np.int64}


def read_tensors(path: str | Path) -> Iterator[tuple[str, str, np.ndarray]]:
    """(name, safetensors dtype, array) of every tensor in one file, one at a time, read with plain
    file reads (no whole-file mapping stays resident). BF16 arrays come as their raw uint16 bits;
    `as_float32` turns float ones into float32. Without torch: the core reads checkpoints this way."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        base = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in RAW_DTYPES:
                raise ModelLoadError(f"{path}: tensor {name} has dtype {info['dtype']}, which sts-edge does not read")
            begin, end = info["data_offsets"]
            f.seek(base + begin)
            array = np.frombuffer(f.read(end - begin), dtype=RAW_DTYPES[info["dtype"]]).reshape(info["shape"])
            yield name, info["dtype"], array


def as_float32(dtype: str, array: np.ndarray) -> np.ndarray:
    """A float tensor from read_tensors as float32 (bfloat16's bits are float32's upper half)."""
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def internal_name(checkpoint_name: str, config: ModelConfig) -> str | None:
    """Our model's name for a checkpoint tensor, or None for tensors we do not use.

    Our modules mirror the Hugging Face layout without the leading `model.`, so the mapping is
    small: drop the prefix, drop precomputed rotary tables, drop lm_head when it is tied.
    """
    if "rotary_emb." in checkpoint_name:
        return None
    if checkpoint_name.startswith("lm_head."):
        return None if config.tie_word_embeddings else checkpoint_name
    return checkpoint_name.removeprefix("model.")


def expected_names(config: ModelConfig) -> set[str]:
    """Every tensor our model needs, by internal name; used to report what a checkpoint lacks."""
    names = {"embed_tokens.weight", "norm.weight"}
    if not config.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(config.num_hidden_layers):
        layer = f"layers.{i}."
        names |= {layer + "input_layernorm.weight", layer + "post_attention_layernorm.weight"}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.add(f"{layer}self_attn.{proj}.weight")
        if config.attention_bias:
            names |= {f"{layer}self_attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")}
        if config.o_proj_bias:
            names.add(f"{layer}self_attn.o_proj.bias")
        if config.qk_norm:
            names |= {layer + "self_attn.q_norm.weight", layer + "self_attn.k_norm.weight"}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.add(f"{layer}mlp.{proj}.weight")
    return names


def check_complete(names: set[str], config: ModelConfig, model_dir: str | Path) -> None:
    """Raise a clear error when the checkpoint lacks tensors the model needs."""
    missing = sorted(expected_names(config) - names)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{model_dir}: the checkpoint lacks {shown}. Is the download complete?")
