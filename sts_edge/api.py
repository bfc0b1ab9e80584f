"""The Python API: load a target (and optionally a draft) once, then generate or stream.

    from sts_edge import load
    engine = load("path/to/Llama-3.1-8B-Instruct", draft="path/to/Llama-3.2-1B-Instruct")
    print(engine.generate([{"role": "user", "content": "Hi!"}], max_tokens=64).text)
    for piece in engine.stream("Once upon a time", temperature=0.7, seed=0):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from sts_edge.backend import (KV_BITS, CausalLM, default_capacity, load_model, peak_memory, reset_peak_memory,
                              resolve_backend)
from sts_edge.calibration import CalibrationError, default_path, load_mapping
from sts_edge.config import ModelConfig
from sts_edge.errors import IncompatibleModelsError, ModelLoadError
from sts_edge.mask import GRANULARITIES, LayerHeadMap, MaskPolicy
from sts_edge.models import resolve_model
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


POLICY_OPTIONS = ("budget", "sink", "window", "dense_layers", "aggregation", "granularity", "drafting", "candidates")


class Engine:
    """A loaded target (and draft) with their tokenizer. One request runs at a time.

    `policy` is the default mask policy (sts when there is a draft, else dense); `calibration`
    maps granularity to the calibrated LayerHeadMap, when a calibration file was found.
    """

    def __init__(
        self,
        target: CausalLM,
        tokenizer: Tokenizer,
        draft: CausalLM | None = None,
        backend: str = "",
        policy: MaskPolicy | None = None,
        calibration: dict[str, LayerHeadMap] | None = None,
    ):
        self.target, self.draft, self.tokenizer, self.backend = target, draft, tokenizer, backend
        self.policy = policy or default_policy(draft is not None, target.capacity)
        self.policy.check_model(target.config, target.capacity)
        self.calibration = calibration or {}
        self._busy = threading.Lock()
        self._cache_tokens: list[int] = []  # tokens behind the KV caches, for prefix reuse

    def resolve_policy(self, use_draft: bool, policy: str | MaskPolicy | None = None, **overrides: Any) -> MaskPolicy:
        """The engine's policy with a call's overrides (a name or a MaskPolicy, and single settings)."""
        if isinstance(policy, MaskPolicy):
            base = policy
        elif policy is not None:
            base = dataclasses.replace(self.policy, name=policy)
        elif self.policy.name == "sts" and not use_draft:
            base = dataclasses.replace(self.policy, name="dense")  # no draft, no draft scores
        else:
            base = self.policy
        unknown = set(overrides) - set(POLICY_OPTIONS)
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}")
        chosen = {k: (tuple(v) if k == "dense_layers" else v) for k, v in overrides.items() if v is not None}
        return dataclasses.replace(base, **chosen) if chosen else base

    @property
    def default_gamma(self) -> int:
        """Draft tokens per round when a call does not say: 4, and 2 on the PyTorch CPU backend,
        where a draft step costs 0.4 of a target step and a verification block of three tokens
        1.2 single steps: gamma 2 measured fastest on the demo pair, dense and STS, at 1K and 4K
        (benchmarks/README.md, the CPU path)."""
        return 2 if self.backend == "torch-cpu" else 4

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
        gamma: int | None = None,
        use_draft: bool = True,
        stats: GenerationStats | None = None,
        reuse_cache: bool = False,
        policy: str | MaskPolicy | None = None,
        **policy_options: Any,
    ) -> Iterator[int]:
        """Yield generated token ids. A list of ints is taken as an already tokenized prompt.

        `policy` ("dense", "sts", "oracle", "streaming", "quest" or a MaskPolicy) and the
        policy options (budget, sink, window, dense_layers, aggregation, granularity, drafting, candidates)
        override the engine's default policy for this call; `gamma` defaults to `default_gamma`.
        `reuse_cache` keeps the KV of the prompt's prefix shared with the previous call (what
        `chat` does across turns).
        """
        ids = list(prompt) if prompt and all(isinstance(t, int) for t in prompt) else self.encode(prompt)
        gamma = self.default_gamma if gamma is None else gamma
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        draft = self.draft if use_draft else None
        mask_policy = self.resolve_policy(draft is not None, policy, **policy_options)
        mapping = self.calibration.get(mask_policy.granularity)
        stats = stats if stats is not None else GenerationStats()
        stats.precision = self.target.precision
        if draft is not None and draft.precision != self.target.precision:
            stats.precision = f"target {self.target.precision}; draft {draft.precision}"
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this engine is already generating; run one request at a time (or load another engine)")
        try:
            if not reuse_cache:
                self._cache_tokens.clear()
            reset_peak_memory(self.backend)
            yield from generate_tokens(
                self.target, ids, params, max_tokens, self.tokenizer.eos_token_ids, draft=draft, gamma=gamma,
                stats=stats, policy=mask_policy, mapping=mapping, cache_tokens=self._cache_tokens,
            )
        finally:
            stats.peak_memory_bytes, stats.peak_memory_of = peak_memory(self.backend)
            self._busy.release()

    def stream(self, prompt: Prompt, *, stop: str | Sequence[str] | None = None, tokens: list[int] | None = None,
               **options: Any) -> Iterator[str]:
        """Yield text pieces as they are generated; options as in `stream_tokens`.

        End-of-sequence tokens are not shown. Generation ends at the first `stop` string, which
        is not shown either (text that might begin one is held back until it is clear). `tokens`,
        if given, collects the generated ids.
        """
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        hold = max((len(s) for s in stops), default=1) - 1
        detokenizer = self.tokenizer.detokenizer()
        text, sent = "", 0
        generator = self.stream_tokens(prompt, **options)
        try:
            for token in generator:
                if tokens is not None:
                    tokens.append(token)
                if token in self.tokenizer.eos_token_ids:
                    continue
                text += detokenizer.add(token)
                hits = [i for i in (text.find(s, max(0, sent - hold)) for s in stops) if i >= 0]
                if hits:
                    yield text[sent : min(hits)]
                    stats = options.get("stats")
                    if stats is not None:
                        stats.finish_reason = "stop"
                    return
                if len(text) - hold > sent:
                    yield text[sent : len(text) - hold]
                    sent = len(text) - hold
            text += detokenizer.flush()
            yield text[sent:]
        finally:
            generator.close()

    def generate(self, prompt: Prompt, **options: Any) -> Generation:
        """Generate a whole answer; options as in `stream` and `stream_tokens`."""
        options.setdefault("stats", GenerationStats())
        tokens: list[int] = []
        text = "".join(self.stream(prompt, tokens=tokens, **options))
        return Generation(text, tokens, options["stats"])

    def chat(self, messages: Sequence[dict[str, Any]], **options: Any) -> Generation:
        """Answer the last message of a conversation, reusing the KV cache of the turns before."""
        return self.generate(messages, reuse_cache=True, **options)

    def peak_memory(self) -> int:
        """Peak memory in bytes since the current or last generation started: device memory on a
        GPU, the process's resident set on a CPU (its lifetime peak where the OS cannot reset it)."""
        return peak_memory(self.backend)[0]


def default_policy(with_draft: bool, capacity: int) -> MaskPolicy:
    """sts with a draft, dense without; the window is 64 tokens or a quarter of a small cache."""
    return MaskPolicy("sts" if with_draft else "dense", window=min(MaskPolicy.window, capacity // 4))


def load(
    model: str | Path,
    draft: str | Path | None = None,
    *,
    backend: str = "auto",
    max_seq_len: int | None = None,
    dtype: str | None = None,
    policy: MaskPolicy | None = None,
    calibration: str | Path | None = "auto",
    quantized: bool = False,
    offline: bool | None = None,
    threads: int | None = None,
    draft_kv_bits: int = 16,
) -> Engine:
    """Load a target and optionally a draft for speculation.

    Each is a model directory, an alias (`llama-8b`, see `sts_edge.models.ALIASES`) or a Hugging
    Face repo id, downloaded into the hub cache on first use (`quantized` prefers an alias's 4-bit
    variant; `offline`, default HF_HUB_OFFLINE, never touches the network).

    Configs and tokenizers of both are checked before any weights are read, so a wrong pair fails
    in milliseconds rather than after loading gigabytes. `policy` is the default mask policy
    (sts with a draft). `calibration`: "auto" uses the pair's file from `python -m
    sts_edge.calibrate` when it exists (proportional maps otherwise), a path must exist and fit
    the pair, None ignores calibration. `threads`: a CPU backend's threads (default: one per physical
    core; STS_EDGE_THREADS or OMP_NUM_THREADS set it too). `draft_kv_bits` 8 or 4 quantizes the
    draft's KV cache (16: the model's dtype); the target's stays exact.
    """
    if draft_kv_bits not in KV_BITS:
        raise ValueError(f"draft_kv_bits must be one of {', '.join(map(str, KV_BITS))}, got {draft_kv_bits!r}")
    backend = resolve_backend(backend)
    model = resolve_model(model, quantized=quantized, offline=offline)
    draft = resolve_model(draft, quantized=quantized, offline=offline) if draft is not None else None
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
    # Every setting that config.json can check is checked before gigabytes of weights are read.
    capacity = default_capacity(configs[model], max_seq_len)
    (policy or default_policy(draft is not None, capacity)).check_model(configs[model], capacity)
    target_model = load_model(model, backend, max_seq_len=capacity, dtype=dtype, threads=threads)
    draft_model = None
    maps: dict[str, LayerHeadMap] = {}
    if draft is not None:
        maps = _calibration_maps(model, draft, configs[model], configs[draft], calibration)
        draft_model = load_model(draft, backend, max_seq_len=target_model.capacity, dtype=dtype, threads=threads,
                                 kv_bits=draft_kv_bits)
    return Engine(target_model, tokenizer, draft_model, backend, policy, maps)


def _calibration_maps(target_dir, draft_dir, target_cfg: ModelConfig, draft_cfg: ModelConfig, calibration) -> dict[str, LayerHeadMap]:
    if calibration is None:
        return {}
    path = default_path(target_dir, draft_dir) if calibration == "auto" else Path(calibration)
    if calibration == "auto" and not path.is_file():
        return {}
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    return {g: load_mapping(path, target_dir, draft_dir, target_cfg, draft_cfg, g) for g in GRANULARITIES}
