"""Random-weight model directories of real shapes, for timing where the weights are not at hand.

`write_model` writes config.json, a word-level tokenizer of the model's vocabulary size and bf16
safetensors filled from a small pool of random values (timing does not depend on the values), one
tensor at a time, so an 8B model never sits whole in memory. The directory loads through the
same code as any checkpoint, in sts-edge and in transformers.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models

SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
}
LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5, rope_theta=500000.0,
             max_position_embeddings=131072, torch_dtype="bfloat16", hidden_act="silu", bos_token_id=0,
             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=8192))
POOL = 1 << 22  # random bf16 values, tiled over every tensor


def config_for(shape: str | Path) -> dict:
    """A named shape (SHAPES) or a config.json path: the config of the model to write."""
    if str(shape) in SHAPES:
        return {**LLAMA, **SHAPES[str(shape)]}
    path = Path(shape)
    if not path.is_file():
        raise SystemExit(f"--synthetic takes {', '.join(SHAPES)} or a config.json path, got {shape}")
    return json.loads(path.read_text())


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every weight of a Llama-family model and its shape, in Hugging Face's names."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                   p + "self_attn.q_proj.weight": (q, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                   p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, q),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter)}
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _bf16_pool(seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal(POOL, dtype=np.float32) * 0.02
    return (values.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits (truncated: any values will do)


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    """The safetensors format written by hand (an 8-byte header size, a JSON header, the raw data), so
    tensors stream to disk one at a time; norms are ones, as a freshly initialised model's."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    pool = _bf16_pool(seed)
    one = np.full(1, 0x3F80, dtype=np.uint16)  # bf16 1.0
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape in shapes.items():
            count = int(np.prod(shape))
            source = one if name.endswith("norm.weight") else pool
            for begin in range(0, count, POOL):
                out.write(np.resize(source, min(POOL, count - begin)).tobytes())


def write_model(shape: str | Path, out_dir: Path, seed: int = 0) -> Path:
    """out_dir with a random model of `shape`, written once (a marker file says it is complete)."""
    done = out_dir / ".complete"
    if done.exists():
        return out_dir
    config = config_for(shape)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = config["vocab_size"]
    config.setdefault("eos_token_id", vocab - 1)
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": f"t{config['eos_token_id']}"}))
    write_safetensors(out_dir / "model.safetensors", tensor_shapes(config), seed)
    done.touch()
    return out_dir
