"""Tokenizer, chat template and end-of-sequence ids of a Hugging Face model directory.

Encoding and decoding go through the `tokenizers` library (tokenizer.json); the chat template from
tokenizer_config.json (or chat_template.jinja) is rendered with jinja2 the way transformers does;
end-of-sequence ids come from generation_config.json and tokenizer_config.json together.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

from sts_edge.errors import ChatTemplateError, ModelLoadError


def _token_text(token: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(
                f"{model_dir}: no tokenizer.json. sts-edge reads fast tokenizers only; "
                "save one with transformers' AutoTokenizer.from_pretrained(...).save_pretrained(dir)."
            )
        self.model_dir = model_dir
        self._tok = HFTokenizer.from_file(str(path))
        config = _read_json(model_dir / "tokenizer_config.json")
        generation = _read_json(model_dir / "generation_config.json")

        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.chat_template = self._find_chat_template(model_dir, config)

        eos_ids = generation.get("eos_token_id", [])
        eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids])
        if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
            eos_ids.add(self._tok.token_to_id(self.eos_token))
        self.eos_token_ids: frozenset[int] = frozenset(int(i) for i in eos_ids if i is not None)

    @staticmethod
    def _find_chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
        template_file = model_dir / "chat_template.jinja"
        if template_file.is_file():
            return template_file.read_text(encoding="utf-8")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            by_name = {t.get("name"): t.get("template") for t in template}
            template = by_name.get("default", next(iter(by_name.values()), None))
        return template

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def vocabulary(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Iterable[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        from jinja2.exceptions import TemplateError

        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template (its tokenizer_config.json has no "
                                    "'chat_template'); pass a plain prompt instead of messages")
        rendered, size = [], 0
        _render.deadline = time.monotonic() + MAX_TEMPLATE_SECONDS
        try:
            for piece in _compiled_template(self.chat_template).generate(
                    messages=list(messages), add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token or "", eos_token=self.eos_token or ""):
                _check_render_time()
                size += len(piece)
                if size > MAX_TEMPLATE_CHARS:
                    raise ChatTemplateError(f"the chat template wrote more than {MAX_TEMPLATE_CHARS} characters for "
                                            "these messages, more than any KV cache holds; stopped")
                rendered.append(piece)
        except TemplateError as err:  # raise_exception (bad role order, say), undefined names, the sandbox
            raise ChatTemplateError(f"the model's chat template refused these messages: {err}") from None
        finally:
            _render.deadline = float("inf")
        return "".join(rendered)

    def encode_chat(self, messages: Iterable[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        # The template writes the BOS token itself, so the post-processor must not add another.
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)


_TEMPLATE_CACHE: dict[str, Any] = {}
# A rendered prompt longer than this, or a render taking longer, is a template running away (a loop
# in a hostile template), not a conversation: rendering stops there. Time is checked at every call
# the template makes (a loop's range() included) and every piece it writes, which bounds every loop
# that does either; a loop that does neither over a long string is beyond what the sandbox can see.
MAX_TEMPLATE_CHARS = 1 << 24
MAX_TEMPLATE_SECONDS = 5.0
_render = threading.local()  # this thread's render deadline


def _check_render_time() -> None:
    if time.monotonic() > getattr(_render, "deadline", float("inf")):
        raise ChatTemplateError(f"the chat template ran for more than {MAX_TEMPLATE_SECONDS:g} s on these "
                                "messages; stopped")


def _compiled_template(source: str) -> Any:
    """Compile a chat template once, with the same environment transformers uses."""
    if source not in _TEMPLATE_CACHE:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        class TimedSandbox(ImmutableSandboxedEnvironment):
            def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
                _check_render_time()
                return super().call(__context, __obj, *args, **kwargs)

        env = TimedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATE_CACHE[source] = env.from_string(source)
    return _TEMPLATE_CACHE[source]


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces without splitting multi-byte characters.

    Decodes a short window of recent tokens rather than the whole sequence each step (the
    incremental scheme vLLM uses), and holds text back while it ends in a partial character.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_id: int) -> str:
        """Add one token; return the new text it completes (possibly empty)."""
        self.ids.append(token_id)
        decode = self._tokenizer.decode
        prefix_text = decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = decode(self.ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever text is still held back at the end of generation."""
        decode = self._tokenizer.decode
        rest = decode(self.ids[self._prefix_offset :])[len(decode(self.ids[self._prefix_offset : self._read_offset])) :]
        self._prefix_offset = self._read_offset = len(self.ids)
        return rest
