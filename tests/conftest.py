"""Shared fixtures: tiny random models written as real Hugging Face model directories.

Tests load these directories through the same path a user's downloaded model takes (config.json,
safetensors shards, tokenizer.json, tokenizer_config.json, generation_config.json), and compare
against transformers loading the very same directory (`hf_model`), which is the oracle.

Everything is built locally: the tokenizer is trained on a corpus embedded below and the weights
are random, so no test ever touches the Hugging Face hub. torch, transformers and tokenizers are
imported inside the functions that need them, so collecting tests that do not use these fixtures
stays fast.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest

# Without a GPU, the Triton kernels run on the CPU through Triton's interpreter (CI sets this too).
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

if TYPE_CHECKING:  # only for annotations; importing these at collection time would be slow
    import torch
    from tokenizers import Tokenizer as HFTokenizer

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

BOS_TOKEN = "<|begin_of_text|>"
END_OF_TEXT_TOKEN = "<|end_of_text|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
# Llama 3 keeps its special tokens after the learned vocabulary; we add them in this order after
# training, so their ids are the last five of the tokenizer (not 0..4, which would hide bugs
# that assume BOS/EOS sit at small ids).
SPECIAL_TOKENS = [BOS_TOKEN, END_OF_TEXT_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN]

# Llama-3-style chat template, on one line so jinja's trim_blocks/lstrip_blocks (which
# transformers and sts_edge both enable) cannot change the rendered whitespace.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

CORPUS_A = '''\
The old lighthouse stood at the edge of the harbour for more than two hundred years. Every night
the keeper climbed the narrow stairs, trimmed the wick and wound the clockwork that turned the
great lens. Ships coming home through the fog would look for the slow white flash and know that
the rocks were to the north and the safe channel to the south.

When the keeper grew old, the town council decided to replace him with an electric lamp and a
timer. The lamp never slept and never complained, but the children of the town still walked out
along the pier in the evening, hoping to see someone waving from the gallery at the top.

Reading a long document is much like sailing at night: you keep a few landmarks in view and trust
that the rest of the coast is where the chart says it is. A good summary names those landmarks,
the people, the places and the numbers, and leaves the reader free to return for the details.

def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    numbers = [0, 1]
    while len(numbers) < n:
        numbers.append(numbers[-1] + numbers[-2])
    return numbers[:n]


for index, value in enumerate(fibonacci(10)):
    print(f"{index}: {value}")
'''

# A different text, so variant "b" (and "c") learns different merges than variant "a".
CORPUS_B = '''\
Mountain rivers carry gravel down from the glaciers every spring. By summer the water runs clear
and cold, and the trout hold in the deep pools below each waterfall, facing upstream and waiting
for insects to drift past. Fishermen wade in slowly, because a careless step sends ripples across
the whole pool and the fish vanish under the stones.

Bakers wake before dawn to mix flour, water, salt and yeast. The dough rests, rises, is folded
and rises again; only then is it shaped into loaves and slid into an oven hot enough to crack the
crust. Quick bread is never as good, and every baker can tell the difference by the smell alone.

class Counter:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, word: str) -> None:
        self.counts[word] = self.counts.get(word, 0) + 1

    def most_common(self, k: int = 3) -> list[tuple[str, int]]:
        return sorted(self.counts.items(), key=lambda item: -item[1])[:k]
'''

# variant -> (training text, total vocabulary size including the five special tokens).
#   "a": the default; every model fixture uses it.
#   "b": different text AND a different size, for vocabulary-mismatch errors.
#   "c": different text but the SAME size as "a", so a mismatch cannot be caught by size alone.
TOKENIZER_VARIANTS: dict[str, tuple[str, int]] = {
    "a": (CORPUS_A, 330),
    "b": (CORPUS_B, 310),
    "c": (CORPUS_B, 330),
}

# Trained tokenizers, one per variant per session (training takes a moment; reuse makes every
# model directory of a variant share byte-identical tokenizer files).
_TOKENIZER_CACHE: dict[str, "HFTokenizer"] = {}


def _trained_tokenizer(variant: str) -> "HFTokenizer":
    if variant in _TOKENIZER_CACHE:
        return _TOKENIZER_CACHE[variant]
    if variant not in TOKENIZER_VARIANTS:
        raise ValueError(f"unknown tokenizer variant {variant!r}; known: {sorted(TOKENIZER_VARIANTS)}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    text, vocab_size = TOKENIZER_VARIANTS[variant]
    tokenizer = Tokenizer(models.BPE())
    # Byte-level pre-tokenizer + decoder and no normalizer: every string maps to bytes and back,
    # so decode(encode(text)) == text for arbitrary Unicode.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        # All 256 byte symbols, even those absent from the corpus, or round-trips would fail.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Like Llama 3: encode(..., add_special_tokens=True) prepends <|begin_of_text|>.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    assert tokenizer.get_vocab_size(with_added_tokens=True) == vocab_size, "corpus too small for the vocab size"
    _TOKENIZER_CACHE[variant] = tokenizer
    return tokenizer


def special_token_ids(variant: str = "a") -> dict[str, int]:
    """Ids of the five Llama-3 special tokens in a tokenizer variant."""
    tokenizer = _trained_tokenizer(variant)
    return {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}


def make_tokenizer_files(out_dir: Path, variant: str = "a") -> int:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json; return the vocab size.

    generation_config.json is merged into an existing one (save_pretrained writes one), with
    eos_token_id set to [<|end_of_text|>, <|eot_id|>] the way Llama 3.x ships it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _trained_tokenizer(variant)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    ids = special_token_ids(variant)

    tokenizer_config = {
        "added_tokens_decoder": {
            str(ids[token]): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for token in SPECIAL_TOKENS
        },
        "bos_token": BOS_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        # False so that transformers' decode equals the tokenizers library's (no space clean-up).
        "clean_up_tokenization_spaces": False,
        "eos_token": EOT_TOKEN,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")

    generation_path = out_dir / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    generation["bos_token_id"] = ids[BOS_TOKEN]
    generation["eos_token_id"] = [ids[END_OF_TEXT_TOKEN], ids[EOT_TOKEN]]
    generation_path.write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    return tokenizer.get_vocab_size(with_added_tokens=True)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

# Shared by every architecture: tiny, but with a large init scale so logits are far from flat
# (argmax is stable and speculative-decoding acceptance is not a coin flip).
_COMMON_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.1,
}

# arch -> (transformers config class name, model class name, per-arch config). rope_theta values
# follow the real families (SmolLM2 1e5, Mistral v0.3 1e6, Qwen 1e6).
ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rope_theta": 500000.0,
            # original_max_position_embeddings 64 (real: 8192) so that the llama3 scaling actually
            # changes some frequencies at head_dim 16 and short test sequences.
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "tie_word_embeddings": False,
        },
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 1000000.0, "tie_word_embeddings": True},
    ),
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        # head_dim 32 != hidden/heads (16): catches code that derives head_dim from hidden_size.
        {
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
        },
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        {
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "tie_word_embeddings": False,
        },
    ),
    "smollm2": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"num_attention_heads": 4, "num_key_value_heads": 4, "rope_theta": 100000.0, "tie_word_embeddings": True},
    ),
}


def _randomize_weights(model: "torch.nn.Module") -> None:
    """Make weights that transformers initialises to constants random, so omissions show up.

    RMSNorm weights start at exactly 1 (a skipped norm weight would go unnoticed) and q/k/v
    biases at 0 (a dropped Qwen2 bias would go unnoticed). Qwen3's q_norm/k_norm are RMSNorm
    modules too, so they are covered by the first rule.
    """
    import torch

    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.copy_(1.0 + 0.1 * torch.randn_like(module.weight))
            elif isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(mean=0.0, std=0.1)


def _write_classic_config_keys(model_dir: Path) -> dict[str, Any]:
    """Rewrite config.json so it also carries the keys real Hub checkpoints use.

    transformers 5 writes rope settings only as `rope_parameters` and the dtype only as `dtype`.
    Checkpoints on the Hub (Llama 3.1, Qwen2.5, SmolLM2, ...) were saved by transformers 4 and
    carry `rope_theta`, `rope_scaling` and `torch_dtype` instead. We keep what transformers wrote
    and add the classic keys, derived from it so they can never disagree. When both are present
    transformers reads `rope_scaling` (plus `rope_theta`) in preference to `rope_parameters`.
    """
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    rope = dict(config.get("rope_parameters") or {})
    config["rope_theta"] = float(rope["rope_theta"])
    scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
    # Real checkpoints without scaling store "rope_scaling": null.
    config["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    config["dtype"] = "float32"
    config["torch_dtype"] = "float32"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def build_random_model(arch: str, vocab_size: int, *, seed: int = 0, **config_overrides: Any) -> "torch.nn.Module":
    """The in-memory random transformers model make_model_dir saves (float32, eval mode)."""
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
    config_class, model_class, arch_config = ARCHS[arch]
    config_kwargs: dict[str, Any] = {**_COMMON_CONFIG, **arch_config, "vocab_size": vocab_size, "dtype": "float32"}
    config_kwargs.update(config_overrides)
    config = getattr(transformers, config_class)(**config_kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).to(torch.float32)
    _randomize_weights(model)
    return model.eval()


def make_model_dir(
    out_dir: Path,
    arch: str,
    *,
    seed: int = 0,
    shard: bool = False,
    tokenizer_variant: str = "a",
    **config_overrides: Any,
) -> Path:
    """Write a tiny random `arch` model as a Hugging Face model directory and return the directory.

    The model's vocab_size is the tokenizer's rounded up to a multiple of 8, as real checkpoints
    pad their embedding tables; the padding rows are never produced by the tokenizer.
    `config_overrides` go into the transformers config (num_hidden_layers, num_key_value_heads, ...).
    With shard=True the weights are split into several model-0000X-of-0000Y.safetensors files
    plus model.safetensors.index.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_vocab = _trained_tokenizer(tokenizer_variant).get_vocab_size(with_added_tokens=True)
    ids = special_token_ids(tokenizer_variant)
    config_overrides.setdefault("bos_token_id", ids[BOS_TOKEN])
    config_overrides.setdefault("eos_token_id", [ids[END_OF_TEXT_TOKEN], ids[EOT_TOKEN]])
    model = build_random_model(arch, math.ceil(tokenizer_vocab / 8) * 8, seed=seed, **config_overrides)
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if shard:
        save_kwargs["max_shard_size"] = "200KB"  # a few hundred KB of weights -> several shards
    model.save_pretrained(out_dir, **save_kwargs)
    if shard:
        index = out_dir / "model.safetensors.index.json"
        shards = sorted(out_dir.glob("model-*-of-*.safetensors"))
        assert index.is_file() and len(shards) > 1, f"save_pretrained did not shard {out_dir}: {shards}"
    _write_classic_config_keys(out_dir)
    make_tokenizer_files(out_dir, tokenizer_variant)  # after save_pretrained: merges its generation_config
    return out_dir


def load_hf_model(model_dir: Path) -> "torch.nn.Module":
    """The test oracle: transformers' own model loaded from the directory, float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One directory per arch in ARCHS (seed 0, tokenizer "a"); "llama3" is sharded."""
    root = tmp_path_factory.mktemp("models")
    return {arch: make_model_dir(root / arch, arch, seed=0, shard=(arch == "llama3")) for arch in ARCHS}


@pytest.fixture(scope="session")
def draft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A different random llama3 (seed 1, 2 layers, same tokenizer): a draft for model_dirs["llama3"]."""
    return make_model_dir(tmp_path_factory.mktemp("draft") / "llama3-draft", "llama3", seed=1, num_hidden_layers=2)


@pytest.fixture(scope="session")
def other_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama3 whose tokenizer (variant "b") differs from the other fixtures' in content and size."""
    return make_model_dir(tmp_path_factory.mktemp("other-vocab") / "llama3-vocab-b", "llama3", tokenizer_variant="b")


@pytest.fixture(scope="session")
def make_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory for custom directories: make_model(arch, **same kwargs as make_model_dir) -> Path.

    Identical requests within a session return the same directory. Tests must not modify it;
    copy it (shutil.copytree) to a tmp_path first when a test needs to break a checkpoint.
    """
    built: dict[str, Path] = {}

    def make(arch: str, **kwargs: Any) -> Path:
        key = json.dumps([arch, kwargs], sort_keys=True, default=str)
        if key not in built:
            built[key] = make_model_dir(tmp_path_factory.mktemp(f"custom-{arch}"), arch, **kwargs)
        return built[key]

    return make


@pytest.fixture(scope="session")
def hf_model() -> Callable[[Path], "torch.nn.Module"]:
    """hf_model(model_dir) -> the transformers model for that directory (the oracle), cached.

    The returned model is shared across tests: use it under torch.no_grad() and do not mutate it.
    """
    loaded: dict[Path, Any] = {}

    def load(model_dir: Path) -> "torch.nn.Module":
        model_dir = Path(model_dir).resolve()
        if model_dir not in loaded:
            loaded[model_dir] = load_hf_model(model_dir)
        return loaded[model_dir]

    return load
