"""An OpenAI-compatible HTTP server.

    python -m sts_edge.server --model llama-8b --draft llama-1b --port 8080

Endpoints: POST /v1/chat/completions and /v1/completions (streaming with SSE or not),
GET /v1/models and /health. Binds to 127.0.0.1 unless --host says otherwise. Requests are
validated field by field and answered with OpenAI-style error bodies; they run one at a time
(a queue), never interleaved in one KV cache. Beyond OpenAI's fields a request may set top_k,
gamma, policy, budget, sink and window.
"""

from __future__ import annotations

import argparse
import hmac
import json
import math
import os
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from sts_edge.cli import STS_TRADE, HelpFormatter, add_gamma_argument, add_model_arguments, add_policy_arguments, load_from_args
from sts_edge.errors import ContextLengthError, StsEdgeError
from sts_edge.mask import POLICIES, MaskPolicyError
from sts_edge.speculative import MAX_GAMMA, GenerationStats

MAX_BODY_BYTES = 1 << 20


class RequestError(Exception):
    """Answered as an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --- request validation --------------------------------------------------------------------------


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, field: str, expected: str) -> None:
    if not ok:
        raise RequestError(400, f"'{field}' must be {expected}", param=field)


# field -> check of its value (None means "accepted, and only its default behaviour is offered")
COMMON_FIELDS: dict[str, Callable[[Any], bool]] = {
    "model": lambda v: isinstance(v, str),
    "max_tokens": lambda v: v is None or (_integer(v) and v >= 1),
    "max_completion_tokens": lambda v: v is None or (_integer(v) and v >= 1),
    "temperature": lambda v: v is None or (_number(v) and 0 <= v <= 2),
    "top_p": lambda v: v is None or (_number(v) and 0 < v <= 1),
    "top_k": lambda v: v is None or (_integer(v) and v >= 0),
    "seed": lambda v: v is None or _integer(v),
    "stream": lambda v: v is None or isinstance(v, bool),
    "stream_options": lambda v: v is None or (isinstance(v, dict) and set(v) <= {"include_usage"}),
    "stop": lambda v: v is None or (isinstance(v, str) and v != "") or (
        isinstance(v, list) and len(v) <= 4 and all(isinstance(s, str) and s for s in v)),
    "n": lambda v: v is None or v == 1,
    "user": lambda v: v is None or isinstance(v, str),
    "frequency_penalty": lambda v: v is None or v == 0,
    "presence_penalty": lambda v: v is None or v == 0,
    "logprobs": lambda v: v is None or v is False,
    "logit_bias": lambda v: v is None or v == {},
    # sts-edge extensions
    "gamma": lambda v: v is None or (_integer(v) and 1 <= v <= MAX_GAMMA),
    "policy": lambda v: v is None or v in POLICIES,
    "budget": lambda v: v is None or (_number(v) and v > 0),
    "sink": lambda v: v is None or (_integer(v) and v >= 0),
    "window": lambda v: v is None or (_integer(v) and v >= 0),
}
EXPECTED = {
    "model": "a string", "max_tokens": "an integer >= 1", "max_completion_tokens": "an integer >= 1",
    "temperature": "a number from 0 to 2", "top_p": "a number in (0, 1]", "top_k": "an integer >= 0",
    "seed": "an integer", "stream": "a boolean", "stream_options": "an object with include_usage",
    "stop": "a non-empty string or a list of up to 4 of them", "n": "1 (one choice per request)",
    "user": "a string", "frequency_penalty": "0 (penalties are not supported)", "presence_penalty": "0 (penalties are not supported)",
    "logprobs": "false (log-probabilities are not supported)", "logit_bias": "empty (logit bias is not supported)",
    "gamma": f"an integer from 1 to {MAX_GAMMA}", "policy": f"one of {', '.join(POLICIES)}", "budget": "a number > 0",
    "sink": "an integer >= 0", "window": "an integer >= 0",
}
CHAT_ROLES = ("system", "developer", "user", "assistant")


def _message_text(message: Any, index: int) -> dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise RequestError(400, f"'{where}' must be an object with 'role' and 'content'", param=where)
    unknown = set(message) - {"role", "content", "name"}
    if unknown:
        raise RequestError(400, f"Unrecognized field(s) in '{where}': {', '.join(sorted(unknown))}", param=where)
    role, content = message.get("role"), message.get("content")
    _check(role in CHAT_ROLES, f"{where}.role", f"one of {', '.join(CHAT_ROLES)}")
    if isinstance(content, list):  # content parts: text only
        ok = all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content)
        _check(ok, f"{where}.content", "a string or a list of text parts")
        content = "".join(p["text"] for p in content)
    _check(isinstance(content, str), f"{where}.content", "a string or a list of text parts")
    return {"role": "system" if role == "developer" else role, "content": content}


def parse_request(body: dict, chat: bool) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(prompt, generation options, response options) of a validated request."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    main_field = "messages" if chat else "prompt"
    unknown = set(body) - set(COMMON_FIELDS) - {main_field}
    if unknown:
        raise RequestError(400, f"Unrecognized request argument supplied: {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
    for name, check in COMMON_FIELDS.items():
        if name in body:
            _check(check(body[name]), name, EXPECTED[name])
    if main_field not in body:
        raise RequestError(400, f"'{main_field}' is required", param=main_field)
    if chat:
        messages = body["messages"]
        _check(isinstance(messages, list) and len(messages) > 0, "messages", "a non-empty list")
        prompt: Any = [_message_text(m, i) for i, m in enumerate(messages)]
    else:
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        ok = (isinstance(prompt, str) and prompt != "") or (
            isinstance(prompt, list) and len(prompt) > 0 and all(_integer(t) and t >= 0 for t in prompt))
        _check(ok, "prompt", "a non-empty string or a list of token ids")
    options = {
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or 256,
        "temperature": 1.0 if body.get("temperature") is None else float(body["temperature"]),
        "top_p": 1.0 if body.get("top_p") is None else float(body["top_p"]),
        "top_k": body.get("top_k") or 0,
        "seed": body.get("seed"),
        "stop": body.get("stop"),
    }
    for name in ("gamma", "policy", "budget", "sink", "window"):
        if body.get(name) is not None:
            options[name] = body[name]
    response = {"stream": bool(body.get("stream")), "include_usage": bool((body.get("stream_options") or {}).get("include_usage"))}
    return prompt, options, response


# --- the server ------------------------------------------------------------------------------------


class CompletionServer(ThreadingHTTPServer):
    """Holds the engine and the queue; handler threads only parse, wait their turn, and write."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: Any, model_id: str, api_key: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, quiet: bool = False, defaults: dict[str, Any] | None = None,
                 aliases: tuple[str, ...] = ()):
        super().__init__(address, Handler)
        self.engine, self.model_id, self.api_key = engine, model_id, api_key
        self.model_names = {model_id, *aliases}  # what a request's "model" may say: this server runs one model
        self.defaults = defaults or {}  # generation options a request does not set itself
        self.max_body_bytes, self.quiet = max_body_bytes, quiet
        self.queue = threading.Lock()  # one generation at a time; waiting threads queue on it
        self.created = int(time.time())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CompletionServer
    timeout = 60  # seconds a client may stall while sending a request

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    # --- plumbing

    def send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error_body(self, error: RequestError) -> None:
        self.send_json(error.status, error.body())

    def authorised(self) -> bool:
        key = self.server.api_key
        if not key:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

    def read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError(411, "chunked request bodies are not supported; send Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is required")
        if int(length) > self.server.max_body_bytes:
            self.close_connection = True  # the body is not read, so the connection cannot be reused
            raise RequestError(413, f"the request body is {length} bytes; the limit is {self.server.max_body_bytes}")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(400, f"the request body is not valid JSON: {err}") from None

    # --- endpoints

    def do_GET(self) -> None:
        if self.path == "/health":
            self.send_json(200, {"status": "ok"})
        elif not self.authorised():
            self.send_error_body(RequestError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key"))
        elif self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [
                {"id": self.server.model_id, "object": "model", "created": self.server.created, "owned_by": "sts-edge"}]})
        else:
            self.send_error_body(RequestError(404, f"no route {self.path}", code="not_found"))

    def do_POST(self) -> None:
        routes = {"/v1/chat/completions": True, "/v1/completions": False}
        try:
            if self.path not in routes:
                self.close_connection = True
                raise RequestError(404, f"no route {self.path}", code="not_found")
            if not self.authorised():
                self.close_connection = True
                raise RequestError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key")
            chat = routes[self.path]
            body = self.read_json()
            prompt, options, response = parse_request(body, chat)
            if body.get("model") is not None and body["model"] not in self.server.model_names:
                raise RequestError(404, f"The model '{body['model']}' does not exist: this server runs "
                                   f"'{self.server.model_id}' only (GET /v1/models)", param="model", code="model_not_found")
            self.complete(prompt, options, response, chat)
        except RequestError as error:
            self.send_error_body(error)

    def complete(self, prompt: Any, options: dict, response: dict, chat: bool) -> None:
        engine, stats = self.server.engine, GenerationStats()
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        with self.server.queue:
            try:
                ids = list(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], int) else engine.encode(prompt)
                if max(ids) >= engine.target.config.vocab_size:
                    raise RequestError(400, f"token id {max(ids)} is outside the vocabulary ({engine.target.config.vocab_size})", param="prompt")
                pieces = engine.stream(ids, stats=stats, **{**self.server.defaults, **options})
                first = next(pieces)  # errors about the prompt or the settings surface here, before any reply
            except (ContextLengthError, MaskPolicyError, ValueError) as err:
                code = "context_length_exceeded" if isinstance(err, ContextLengthError) else None
                raise RequestError(400, str(err), code=code) from None
            except StsEdgeError as err:
                raise RequestError(500, str(err), kind="server_error") from None
            try:
                if response["stream"]:
                    self.stream_events(ident, first, pieces, stats, len(ids), chat, response["include_usage"])
                else:
                    text = first + "".join(pieces)
                    self.send_json(200, self.full_response(ident, text, stats, len(ids), chat))
            finally:
                pieces.close()

    def usage(self, stats: GenerationStats, prompt_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": stats.generated_tokens,
                "total_tokens": prompt_tokens + stats.generated_tokens}

    @staticmethod
    def finish_reason(stats: GenerationStats) -> str:
        return "stop" if stats.finish_reason == "stop" else "length"

    def full_response(self, ident: str, text: str, stats: GenerationStats, prompt_tokens: int, chat: bool) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason(stats)}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        return {
            "id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": self.server.model_id, "choices": [choice], "usage": self.usage(stats, prompt_tokens),
            "sts": {"acceptance_rate": stats.acceptance_rate, "sparsity": stats.sparsity,
                    "tokens_per_second": stats.rate(stats.generated_tokens, stats.decode_seconds)},
        }

    def stream_events(self, ident: str, first: str, pieces: Any, stats: GenerationStats, prompt_tokens: int,
                      chat: bool, include_usage: bool) -> None:
        self.close_connection = True  # the event stream ends when the connection does
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        created, kind = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

        def event(delta: str | None, finish: str | None = None, role: bool = False, usage: dict | None = None) -> None:
            choices = []
            if delta is not None or finish is not None:
                if chat:
                    body = {"role": "assistant", "content": delta or ""} if role else ({"content": delta} if delta else {})
                    choices = [{"index": 0, "delta": body, "finish_reason": finish}]
                else:
                    choices = [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}]
            chunk = {"id": ident, "object": kind, "created": created, "model": self.server.model_id, "choices": choices}
            if usage is not None:
                chunk["usage"] = usage
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        try:
            event(first, role=chat)
            for piece in pieces:
                if piece:
                    event(piece)
            event(None, finish=self.finish_reason(stats))
            if include_usage:
                event(None, usage=self.usage(stats, prompt_tokens))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left: generation stops when the stream is closed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sts_edge.server",
        description="OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, /health) "
        "for a target model with an optional draft. " + STS_TRADE,
        formatter_class=HelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", default=os.environ.get("STS_EDGE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $STS_EDGE_API_KEY; none means open)")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="largest request body accepted")
    add_gamma_argument(parser)
    add_policy_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        engine = load_from_args(args)
    except (StsEdgeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    # Answers name the model as the user did (an alias, or a directory's name), never a local path.
    given = Path(str(args.model)).expanduser()
    model_id = given.resolve().name if given.is_dir() else str(args.model)
    server = CompletionServer((args.host, args.port), engine, model_id, api_key=args.api_key,
                              max_body_bytes=args.max_body_bytes, defaults={"gamma": args.gamma},
                              aliases=(str(args.model), str(given.resolve())))
    host, port = server.server_address[:2]
    print(f"sts-edge serving {model_id} on http://{host}:{port}/v1 ({engine.backend}, policy {engine.policy.name})",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
