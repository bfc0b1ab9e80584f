"""The Python API: load a target (and optionally a draft) once, then generate or stream.

    from sts_edge import load
    engine = load("path/to/Llama-3.1-8B-Instruct", draft="path/to/Llama-3.2-1B-Instruct")
    print(engine.generate([{"role": "user", "content": "Hi!"}], max_tokens=64).text)
    for piece in engine.stream("Once upon a time", temperature=0.7, seed=0):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from sts_edge.backend import CausalLM, load_model, resolve_backend
from sts_edge.config import ModelConfig
from sts_edge.errors import IncompatibleModelsError, ModelLoadError
from sts_edge.sampling import SamplingParams
from sts_edge.speculative import GenerationStats, generate_tokens
from sts_edge.tokenizer import Tokenizer

Prompt = str | Sequence[dict[str, Any]]


def check_draft_compatible(target: Tokenizer, draft: Tokenizer) -> None:
    """A draft must share the target's tokenizer, or its tokens mean something else."""
    target_vocab, draft_vocab = target.vocabulary(), draft.vocabulary()
    if target_vocab == draft_vocab:
        return
    differing = sorted(set(target_vocab.items()) ^ set(draft_vocab.items()), key=lambda item: item[1])
    example = f"; e.g. {differing[0][0]!r} is id {differing[0][1]} in only one of them" if differing else ""
    raise IncompatibleModelsError(
        f"the draft {draft.model_dir} and the target {target.model_dir} use different tokenizers "
        f"({len(draft_vocab)} vs {len(target_vocab)} tokens{example}). Pick a draft from the target's "
        "model family (e.g. Llama-3.2-1B for Llama-3.1-8B, Qwen2.5-0.5B for Qwen2.5-7B)."
    )


@dataclass
class Generation:
    text: str
    tokens: list[int]
    stats: GenerationStats


class Engine:
    """A loaded target (and draft) with their tokenizer. One request runs at a time."""

    def __init__(self, target: CausalLM, tokenizer: Tokenizer, draft: CausalLM | None = None, backend: str = ""):
        self.target, self.draft, self.tokenizer, self.backend = target, draft, tokenizer, backend
        self._busy = threading.Lock()

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a plain text prompt, or of chat messages rendered with the chat template."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return self.tokenizer.encode_chat(prompt)

    def stream_tokens(
        self,
        prompt: Prompt | list[int],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        gamma: int = 4,
        use_draft: bool = True,
        stats: GenerationStats | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids. A list of ints is taken as an already tokenized prompt."""
        ids = list(prompt) if prompt and all(isinstance(t, int) for t in prompt) else self.encode(prompt)
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this engine is already generating; run one request at a time (or load another engine)")
        try:
            draft = self.draft if use_draft else None
            yield from generate_tokens(
                self.target, ids, params, max_tokens, self.tokenizer.eos_token_ids, draft=draft, gamma=gamma, stats=stats
            )
        finally:
            self._busy.release()

    def stream(self, prompt: Prompt, **options: Any) -> Iterator[str]:
        """Yield text pieces as they are generated (end-of-sequence tokens are not shown)."""
        detokenizer = self.tokenizer.detokenizer()
        for token in self.stream_tokens(prompt, **options):
            if token not in self.tokenizer.eos_token_ids:
                yield detokenizer.add(token)
        yield detokenizer.flush()

    def generate(self, prompt: Prompt, **options: Any) -> Generation:
        """Generate a whole answer; options as in `stream_tokens`."""
        stats = options.pop("stats", None) or GenerationStats()
        tokens = list(self.stream_tokens(prompt, stats=stats, **options))
        shown = [t for t in tokens if t not in self.tokenizer.eos_token_ids]
        return Generation(self.tokenizer.decode(shown), tokens, stats)


def load(
    model: str | Path,
    draft: str | Path | None = None,
    *,
    backend: str = "auto",
    max_seq_len: int | None = None,
    dtype: str | None = None,
) -> Engine:
    """Load a target model directory and optionally a draft model directory for speculation.

    Configs and tokenizers of both are checked before any weights are read, so a wrong pair fails
    in milliseconds rather than after loading gigabytes.
    """
    backend = resolve_backend(backend)
    configs = {model: ModelConfig.from_model_dir(model)}
    tokenizer = Tokenizer(model)
    if draft is not None:
        configs[draft] = ModelConfig.from_model_dir(draft)
        check_draft_compatible(tokenizer, Tokenizer(draft))
    for path, config in configs.items():
        if config.vocab_size < tokenizer.vocab_size:
            raise ModelLoadError(
                f"{path}: config.json has vocab_size {config.vocab_size} but the tokenizer has "
                f"{tokenizer.vocab_size} tokens; the files do not belong together"
            )
    if max_seq_len is not None and max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    target_model = load_model(model, backend, max_seq_len=max_seq_len, dtype=dtype)
    draft_model = None
    if draft is not None:
        draft_model = load_model(draft, backend, max_seq_len=target_model.capacity, dtype=dtype)
    return Engine(target_model, tokenizer, draft_model, backend)
