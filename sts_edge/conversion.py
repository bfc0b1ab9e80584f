"""Model conversion (the command is `python -m sts_edge.convert`): a llama.cpp GGUF file into a
model directory, and any model directory (or GGUF file) into mlx-lm's quantized format.

From GGUF: config.json, safetensors with Hugging Face tensor names (sharded, with an index),
tokenizer.json, tokenizer_config.json (with the chat template) and generation_config.json. The
`gguf` package reads the file and dequantises every tensor type it knows (Q4_K, Q5_0, Q6_K, Q8_0,
F16, F32 and more). Architectures: llama (Llama 3.x, SmolLM2, Mistral), qwen2, qwen3.

Quantized (`quantization=`): every linear layer's weight, and unless kept the embedding table and
LM head, becomes mlx-lm's affine groups (sts_edge/quantization.py), which both backends and mlx-lm
load; config.json gets the `quantization` block. Tensors are read, converted and written one at a
time, in the source's order, so converting twice gives the same bytes.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sts_edge.config import ModelConfig
from sts_edge.errors import ModelLoadError, StsEdgeError
from sts_edge.quantization import BLOCK_VALUES, GROUP_SIZES, Quantization, quantize
from sts_edge.weights import INDEX_FILE, as_float32, checkpoint_files, read_tensors, tensor_shapes

SUPPORTED = ("llama", "qwen2", "qwen3")
SHARD_BYTES = 2 << 30

# GGUF tensor name (after blk.N.) -> Hugging Face name (after model.layers.N.)
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# GGUF pre-tokenizer name -> the split regex its merges were learned with (as transformers maps them).
_QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPLITS = {"qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT,
          "smollm": None, "default": None}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def hf_tensor_name(gguf_name: str) -> str | None:
    """Hugging Face name of a GGUF tensor, or None for tensors that become config (rope_freqs)."""
    base, _, suffix = gguf_name.rpartition(".")
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match and match.group(2) in LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}.{suffix}"
    if base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{suffix}"
    if base == "rope_freqs":
        return None
    raise ModelLoadError(f"unknown GGUF tensor {gguf_name!r}")


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows (interleaved rotary pairs back to rotate-half)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int) -> dict:
    """Recover Llama 3's rope_scaling from llama.cpp's per-frequency factors, or refuse."""
    factor = float(factors.max())
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    expected = np.where(wavelen < 8192 / 4.0, 1.0, np.where(wavelen > 8192, factor, 1 / ((1 - smooth) / factor + smooth)))
    if not np.allclose(factors, expected, rtol=1e-3):
        raise ModelLoadError("this GGUF's rope frequency factors are not Llama 3's standard scaling; not supported")
    return scaling


def gguf_config(reader: Any) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED)}")
    tensors = {t.name: t for t in reader.tensors}
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "bfloat16",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if arch == "llama" and "rope_freqs.weight" in tensors:
        factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64)
        config["rope_scaling"] = _llama3_rope_scaling(factors, theta, head_dim)
    return config


def gguf_tokenizer(reader: Any) -> tuple[Any, dict[str, Any]]:
    """A `tokenizers` byte-level BPE tokenizer and tokenizer_config.json from GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(f"GGUF tokenizer {kind!r} is not supported (byte-level BPE 'gpt2' is: Llama 3, Qwen)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", []))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in SPLITS:
        raise ModelLoadError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(SPLITS)}")
    split = SPLITS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    tokenizer.pre_tokenizer = byte_level if split is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == CONTROL])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == USER_DEFINED])

    def token(key: str) -> str | None:
        index = _field(reader, f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None else None

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "model_max_length": int(_field(reader, f"{_field(reader, 'general.architecture')}.context_length", 4096)),
    }
    return tokenizer, tokenizer_config


STORE_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}  # config torch_dtype -> safetensors


def float_bytes(array: np.ndarray, dtype: str) -> bytes:
    """float32 values as raw little-endian bytes of safetensors dtype "BF16" (round to nearest
    even), "F16" or "F32"."""
    if dtype == "F16":
        return np.ascontiguousarray(array, dtype=np.float16).tobytes()
    if dtype == "F32":
        return np.ascontiguousarray(array, dtype=np.float32).tobytes()
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).tobytes()


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A safetensors file: an 8-byte header length, a JSON header, then the tensors' bytes.

    Written directly because numpy has no bfloat16 and the format is this simple.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for _, _, data in tensors.values():
            f.write(data)


MARKER = "sts-edge-convert.json"  # lists the files a conversion wrote, so --force removes only those


class OutputDirError(StsEdgeError):
    """The output path holds something a conversion must not touch."""


def check_output(out_dir: Path, force: bool) -> None:
    """Refuse, before any work, an output that is a file, a directory of someone else's files, or
    (without `force`) a model directory an earlier conversion wrote."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"--out {out_dir} is an existing file; give a new or empty directory")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not (out_dir / MARKER).is_file():
        raise OutputDirError(
            f"--out {out_dir} is a directory with files that sts-edge did not write; nothing was changed. "
            "Give a new or empty directory (--force only replaces a model directory sts-edge converted)."
        )
    if not force:
        raise OutputDirError(f"--out {out_dir} already holds a converted model; pass --force to replace it")


class ModelDirWriter:
    """Writes a model directory in a private staging directory beside `out_dir`, then installs it.

    Nothing appears at `out_dir` until every file is written; on any failure (Ctrl-C included) the
    staging directory is removed and `out_dir` is as it was. Replacing an earlier conversion
    removes only the files its marker lists, so a user's own files in it survive.
    """

    def __init__(self, out_dir: Path, force: bool = False):
        self.out_dir = Path(out_dir)
        check_output(self.out_dir, force)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", suffix=".partial", dir=self.out_dir.parent))

    def __enter__(self) -> "ModelDirWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None:
            shutil.rmtree(self.staging, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.staging / name

    def install(self) -> Path:
        written = sorted(p.name for p in self.staging.iterdir())
        (self.staging / MARKER).write_text(json.dumps({"written_by": "sts_edge.convert", "files": written}, indent=1))
        if self.out_dir.is_dir():
            marker = self.out_dir / MARKER
            ours = set(json.loads(marker.read_text()).get("files", [])) if marker.is_file() else set()
            theirs = {p.name for p in self.out_dir.iterdir()} - ours - {MARKER}
            if theirs & set(written):
                raise OutputDirError(f"{self.out_dir} holds {sorted(theirs & set(written))}, which sts-edge did not "
                                     "write and would overwrite; move them away or choose another directory")
            for name in ours & {p.name for p in self.out_dir.iterdir() if p.is_file()}:  # an earlier conversion's
                (self.out_dir / name).unlink()
            marker.unlink(missing_ok=True)
            for path in self.staging.iterdir():
                path.replace(self.out_dir / path.name)
            self.staging.rmdir()
        else:
            self.staging.rename(self.out_dir)
        return self.out_dir


def open_gguf(gguf_path: Path):
    """A GGUFReader for `gguf_path`, or an error that says what is wrong with the path."""
    from gguf import GGUFReader

    if gguf_path.is_dir():
        raise ModelLoadError(f"--gguf {gguf_path} is a directory; pass the .gguf file itself")
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file {gguf_path} does not exist")
    try:
        return GGUFReader(str(gguf_path))
    except (ValueError, OSError) as err:
        raise ModelLoadError(f"{gguf_path} is not a readable GGUF file: {err}") from None


def quantized_here(name: str, shape: tuple[int, ...], quantization: Quantization | None) -> bool:
    """Whether a conversion quantizes this Hugging Face tensor: the linear layers' weights, and the
    embedding table and LM head unless they are kept."""
    if quantization is None or len(shape) != 2 or not name.endswith(".weight"):
        return False
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return not quantization.keep_embeddings
    return name.endswith("_proj.weight")


def check_quantizable(shapes: dict[str, tuple[int, ...]], quantization: Quantization | None) -> None:
    """Refuse, before any work, a model with a layer the group size does not divide."""
    uneven = [f"{name} {list(shape)}" for name, shape in shapes.items()
              if quantized_here(name, shape, quantization) and shape[1] % quantization.group_size]
    if uneven:
        raise ModelLoadError(f"groups of {quantization.group_size} do not divide the inputs of {', '.join(uneven[:3])}; "
                             f"choose another --group-size ({', '.join(map(str, GROUP_SIZES))})")


def write_weights(writer: ModelDirWriter, tensors: Iterator[tuple[str, np.ndarray]], count: int, store: str,
                  quantization: Quantization | None, description: str, progress: bool) -> None:
    """Shards of (Hugging Face name, float32 array) tensors in safetensors dtype `store`, the ones
    `quantized_here` picks as packed weights with scales and biases, and the index over them."""
    from tqdm import tqdm

    shards: list[dict[str, tuple[str, list[int], bytes]]] = [{}]
    shard_bytes = 0

    def add(name: str, dtype: str, shape: list[int], data: bytes) -> None:
        nonlocal shard_bytes
        if shard_bytes + len(data) > SHARD_BYTES and shards[-1]:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = (dtype, shape, data)
        shard_bytes += len(data)

    for name, array in tqdm(tensors, total=count, desc=description, unit="tensor", disable=not progress):
        if quantized_here(name, array.shape, quantization):
            module = name.removesuffix(".weight")
            packed, scales, biases = quantize(array, quantization.group_size, quantization.bits,
                                              {"F16": "float16", "BF16": "bfloat16"}.get(store))
            add(name, "U32", list(packed.shape), packed.tobytes())
            add(f"{module}.scales", store, list(scales.shape), float_bytes(scales, store))
            add(f"{module}.biases", store, list(biases.shape), float_bytes(biases, store))
        else:
            add(name, store, list(array.shape), float_bytes(array, store))
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(writer.path(filename), shard)
        weight_map.update(dict.fromkeys(shard, filename))
        shard.clear()  # free the bytes before the next shard is written
    writer.path("model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


def dequantize_gguf(tensor: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A GGUF tensor decoded to float32 `shape` by the gguf package, a block of rows at a time: its
    numpy decoding holds temporaries several times what it decodes (gigabytes for an embedding
    table at once). The file's rows are the tensor's."""
    from gguf.quants import dequantize

    if tensor.data.ndim < 2:
        return dequantize(tensor.data, tensor.tensor_type).reshape(shape)
    out = np.empty(shape, dtype=np.float32)
    rows = max(1, BLOCK_VALUES // int(np.prod(shape[1:])))
    for first in range(0, shape[0], rows):
        block = tensor.data[first : first + rows]
        out[first : first + rows] = dequantize(block, tensor.tensor_type).reshape(len(block), *shape[1:])
    return out


def convert(gguf_path: str | Path, out_dir: str | Path, progress: bool = True, force: bool = False,
            quantization: Quantization | None = None) -> Path:
    """Convert a GGUF file into a model directory at `out_dir`, which must be new, empty, or (with
    `force`) a model directory converted before. The output is checked before the file is read."""
    with ModelDirWriter(Path(out_dir), force) as writer:
        gguf_path = Path(gguf_path)
        reader = open_gguf(gguf_path)
        config = gguf_config(reader)
        tokenizer, tokenizer_config = gguf_tokenizer(reader)
        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        permuted = config["model_type"] == "llama"  # llama.cpp reorders q/k rows for llama only
        named = [(hf_tensor_name(t.name), t) for t in reader.tensors]
        named = [(name, tensor) for name, tensor in named if name is not None]
        # GGUF lists dimensions fastest first
        shapes = {name: tuple(int(d) for d in reversed(tensor.shape.tolist())) for name, tensor in named}
        check_quantizable(shapes, quantization)

        def tensors() -> Iterator[tuple[str, np.ndarray]]:
            for name, tensor in named:
                weight = dequantize_gguf(tensor, shapes[name])
                if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
                    weight = unpermute(weight, heads if "q_proj" in name else kv_heads)
                yield name, weight

        write_weights(writer, tensors(), len(named), "BF16", quantization, f"converting {gguf_path.name}", progress)
        if quantization is not None:
            config["quantization"] = config["quantization_config"] = quantization.config()
        writer.path("config.json").write_text(json.dumps(config, indent=1))
        tokenizer.save(str(writer.path("tokenizer.json")))
        writer.path("tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
        generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        writer.path("generation_config.json").write_text(json.dumps(generation, indent=1))
        return writer.install()


def quantize_model(model_dir: str | Path, out_dir: str | Path, quantization: Quantization, progress: bool = True,
                   force: bool = False) -> Path:
    """Write a model directory's weights in mlx-lm's quantized format at `out_dir` (new, empty, or
    with `force` converted before), with its config (plus the `quantization` block) and its other
    files (tokenizer, chat template, generation settings) copied."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else None
    if config is None:
        raise ModelLoadError(f"{model_dir}: no config.json here; is this a Hugging Face model directory?")
    if config.get("quantization"):
        raise ModelLoadError(f"{model_dir} is quantized already; convert from the floating-point model")
    ModelConfig.from_dict(config, source=str(model_dir / "config.json"))  # a supported architecture
    files = checkpoint_files(model_dir)
    shapes = tensor_shapes(model_dir)
    check_quantizable(shapes, quantization)
    store = STORE_DTYPES.get(config.get("torch_dtype") or config.get("dtype"), "BF16")

    with ModelDirWriter(Path(out_dir), force) as writer:
        def tensors() -> Iterator[tuple[str, np.ndarray]]:
            for path in files:
                for name, dtype, array in read_tensors(path):
                    if "rotary_emb." not in name:
                        yield name, as_float32(dtype, array)

        count = sum(1 for name in shapes if "rotary_emb." not in name)
        write_weights(writer, tensors(), count, store, quantization, f"quantizing {model_dir.name}", progress)
        config["quantization"] = config["quantization_config"] = quantization.config()
        writer.path("config.json").write_text(json.dumps(config, indent=1))
        weights = {p.name for p in files} | {INDEX_FILE, MARKER, "config.json"}
        for path in sorted(model_dir.iterdir()):  # tokenizer, chat template, generation settings
            if path.is_file() and path.name not in weights and path.suffix not in (".safetensors", ".bin", ".gguf", ".pt"):
                shutil.copyfile(path, writer.path(path.name))
        return writer.install()
