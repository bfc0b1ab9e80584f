"""An OpenAI-compatible HTTP server.

    sts-server --model llama-8b --draft llama-1b --port 8080

(`sts-server` rather than `python -m sts_edge.server`, which puts the working directory first on
the import path: started inside a downloaded model directory, that directory's .py files would be
imported.) Endpoints: POST /v1/chat/completions and /v1/completions (streaming with SSE or not),
GET /v1/models, /health and /metrics (Prometheus text). Binds to 127.0.0.1 unless --host says
otherwise. Requests are validated field by field, and every one is answered, with OpenAI-style
JSON error bodies for what is refused; they run one at a time (a bounded queue), never interleaved
in one KV cache, and a request whose client has left is cancelled at its next token. Bound to
loopback, the server refuses what a web page could send it: a foreign Host (DNS rebinding), an
Origin that --cors-origin does not allow, a body that is not application/json. Beyond OpenAI's
fields a request may set top_k, gamma, policy, budget, sink, window and candidates.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import math
import os
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from sts_edge.cli import STS_TRADE, HelpFormatter, add_gamma_argument, add_model_arguments, add_policy_arguments, load_from_args
from sts_edge.errors import ChatTemplateError, ContextLengthError, StsEdgeError
from sts_edge.mask import POLICIES, MaskPolicyError
from sts_edge.speculative import MAX_GAMMA, GenerationStats

MAX_BODY_BYTES = 1 << 20
MAX_QUEUE = 16  # requests waiting for the model beyond the one it runs; more are answered 503
MAX_CONNECTIONS = 64  # open connections (one thread each); more are answered 503 and closed
REQUEST_SECONDS = 30  # to send a whole request (line, headers, body) once its first byte arrives
IDLE_SECONDS = 60  # a keep-alive connection waiting for its next request
MAX_BUDGET = 1 << 31  # token budgets above any context; also keeps numpy's integers from overflowing
ALLOWED_METHODS = "GET, POST, OPTIONS"


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


def _text(value: Any) -> bool:
    """A string the tokenizer can take: JSON's \ud800 escapes decode to lone surrogates, which no
    encoding writes."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check(ok: bool, field: str, expected: str) -> None:
    if not ok:
        raise RequestError(400, f"'{field}' must be {expected}", param=field)


# field -> check of its value (None means "accepted, and only its default behaviour is offered")
COMMON_FIELDS: dict[str, Callable[[Any], bool]] = {
    "model": _text,
    "max_tokens": lambda v: v is None or (_integer(v) and v >= 1),
    "max_completion_tokens": lambda v: v is None or (_integer(v) and v >= 1),
    "temperature": lambda v: v is None or (_number(v) and 0 <= v <= 2),
    "top_p": lambda v: v is None or (_number(v) and 0 < v <= 1),
    "top_k": lambda v: v is None or (_integer(v) and v >= 0),
    "seed": lambda v: v is None or (_integer(v) and 0 <= v < 2**64),
    "stream": lambda v: v is None or isinstance(v, bool),
    "stream_options": lambda v: v is None or (isinstance(v, dict) and set(v) <= {"include_usage"}
                                              and isinstance(v.get("include_usage", False), bool)),
    "stop": lambda v: v is None or (_text(v) and v != "") or (
        isinstance(v, list) and len(v) <= 4 and all(_text(s) and s for s in v)),
    "n": lambda v: v is None or (_integer(v) and v == 1),
    "user": lambda v: v is None or _text(v),
    "frequency_penalty": lambda v: v is None or (_number(v) and v == 0),
    "presence_penalty": lambda v: v is None or (_number(v) and v == 0),
    "logprobs": lambda v: v is None or v is False,
    "logit_bias": lambda v: v is None or v == {},
    # sts-edge extensions
    "gamma": lambda v: v is None or (_integer(v) and 1 <= v <= MAX_GAMMA),
    "policy": lambda v: v is None or v in POLICIES,
    "budget": lambda v: v is None or (_number(v) and 0 < v <= MAX_BUDGET),
    "sink": lambda v: v is None or (_integer(v) and v >= 0),
    "window": lambda v: v is None or (_integer(v) and v >= 0),
    "candidates": lambda v: v is None or (_integer(v) and 1 <= v <= MAX_BUDGET),
}
EXPECTED = {
    "model": "a string", "max_tokens": "an integer >= 1", "max_completion_tokens": "an integer >= 1",
    "temperature": "a number from 0 to 2", "top_p": "a number in (0, 1]", "top_k": "an integer >= 0",
    "seed": "an integer from 0 to 2^64 - 1", "stream": "a boolean",
    "stream_options": "an object with include_usage (a boolean)",
    "stop": "a non-empty string or a list of up to 4 of them", "n": "1 (one choice per request)",
    "user": "a string", "frequency_penalty": "0 (penalties are not supported)", "presence_penalty": "0 (penalties are not supported)",
    "logprobs": "false (log-probabilities are not supported)", "logit_bias": "empty (logit bias is not supported)",
    "gamma": f"an integer from 1 to {MAX_GAMMA}", "policy": f"one of {', '.join(POLICIES)}",
    "budget": "a number > 0 (below 1 a share of the context, else tokens, at most 2^31)",
    "sink": "an integer >= 0", "window": "an integer >= 0",
    "candidates": "an integer from 1 to 2^31 (nominations per budget token)",
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
        ok = all(isinstance(p, dict) and p.get("type") == "text" and _text(p.get("text")) for p in content)
        _check(ok, f"{where}.content", "a string or a list of text parts")
        content = "".join(p["text"] for p in content)
    _check(_text(content), f"{where}.content", "a string or a list of text parts")
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
        ok = (_text(prompt) and prompt != "") or (
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
    for name in ("gamma", "policy", "budget", "sink", "window", "candidates"):
        if body.get(name) is not None:
            options[name] = body[name]
    response = {"stream": bool(body.get("stream")), "include_usage": bool((body.get("stream_options") or {}).get("include_usage"))}
    return prompt, options, response


# --- the server ------------------------------------------------------------------------------------


class Metrics:
    """Counters for GET /metrics (Prometheus' text format, which local dashboards read)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.responses: dict[int, int] = {}
        self.cancelled = 0
        self.waiting = 0  # requests queued for the model, the running one included
        self.prompt_tokens = self.generated_tokens = 0
        self.decode_seconds = 0.0
        self.acceptance = self.sparsity = 0.0  # of the last finished request

    def finished(self, stats: GenerationStats, prompt_tokens: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += stats.generated_tokens
            self.decode_seconds += stats.decode_seconds
            self.acceptance, self.sparsity = stats.acceptance_rate or 0.0, stats.sparsity or 0.0

    def text(self) -> str:
        with self.lock:
            lines = ["# TYPE sts_edge_responses_total counter"]
            lines += [f'sts_edge_responses_total{{status="{code}"}} {n}' for code, n in sorted(self.responses.items())]
            for name, kind, value in (
                    ("requests_cancelled_total", "counter", self.cancelled), ("queue_depth", "gauge", self.waiting),
                    ("prompt_tokens_total", "counter", self.prompt_tokens),
                    ("generated_tokens_total", "counter", self.generated_tokens),
                    ("decode_seconds_total", "counter", round(self.decode_seconds, 6)),
                    ("acceptance_rate", "gauge", self.acceptance), ("sparsity", "gauge", self.sparsity)):
                lines += [f"# TYPE sts_edge_{name} {kind}", f"sts_edge_{name} {value}"]
        return "\n".join(lines) + "\n"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class CompletionServer(ThreadingHTTPServer):
    """Holds the engine and the queue; handler threads only parse, wait their turn, and write."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: Any, model_id: str, api_key: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, quiet: bool = False, defaults: dict[str, Any] | None = None,
                 aliases: tuple[str, ...] = (), cors_origins: tuple[str, ...] = (), max_queue: int = MAX_QUEUE,
                 max_connections: int = MAX_CONNECTIONS):
        super().__init__(address, Handler)
        self.engine, self.model_id, self.api_key = engine, model_id, api_key
        self.model_names = {model_id, *aliases}  # what a request's "model" may say: this server runs one model
        self.defaults = defaults or {}  # generation options a request does not set itself
        self.max_body_bytes, self.quiet = max_body_bytes, quiet
        self.cors_origins = set(cors_origins)  # "*" allows every origin
        # Bound to loopback, only loopback names may appear in Host: a web page that rebinds its own
        # name to 127.0.0.1 (DNS rebinding) sends its name, and is refused.
        bound = str(address[0]).strip("[]")
        self.host_names = {"localhost", "127.0.0.1", "::1", bound} if is_loopback(bound) else None
        self.queue = threading.Lock()  # one generation at a time; waiting threads queue on it
        self.max_queue = max_queue
        self.connections = threading.BoundedSemaphore(max_connections)
        self.metrics = Metrics()
        self.created = int(time.time())

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self.connections.acquire(blocking=False):
            # Every thread is taken: say so and close, without a thread for this connection.
            body = json.dumps(RequestError(503, "too many connections; retry shortly", kind="server_error").body())
            try:
                request.sendall(f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: "
                                f"{len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}".encode())
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()


class DeadlineReader:
    """The request stream, read under one deadline per request: a client that sends a header line
    now and then cannot hold a connection (a per-read timeout alone would let it)."""

    def __init__(self, stream: Any, connection: socket.socket):
        self.stream, self.connection = stream, connection
        self.deadline = time.monotonic() + IDLE_SECONDS

    def start(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took too long to arrive")
        self.connection.settimeout(left)

    def readline(self, limit: int = -1) -> bytes:
        self._arm()
        return self.stream.readline(limit)

    def read(self, size: int = -1) -> bytes:
        self._arm()
        return self.stream.read(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CompletionServer
    disable_nagle_algorithm = True  # small replies would otherwise wait ~40 ms for the client's delayed ACK
    timeout = IDLE_SECONDS

    def setup(self) -> None:
        super().setup()
        self.rfile = DeadlineReader(self.rfile, self.connection)

    def handle_one_request(self) -> None:
        self.rfile.start(IDLE_SECONDS)  # the wait for the next request on a kept-alive connection
        self.responded = False
        try:
            super().handle_one_request()
        except TimeoutError:
            self.close_connection = True

    def parse_request(self) -> bool:
        self.rfile.start(REQUEST_SECONDS)  # its first line has arrived: the rest of it has this long
        return super().parse_request()

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    # --- plumbing

    def send_json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_common_headers(headers)
        self.end_headers()
        self.wfile.write(data)

    def send_common_headers(self, headers: dict[str, str] | None = None) -> None:
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        headers = getattr(self, "headers", None)  # absent where the request line itself was malformed
        origin = headers.get("Origin") if headers is not None else None
        if origin and self.origin_allowed(origin):
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        if self.close_connection:
            self.send_header("Connection", "close")

    def send_response(self, code: int, message: str | None = None) -> None:
        self.responded = True
        with self.server.metrics.lock:
            self.server.metrics.responses[code] = self.server.metrics.responses.get(code, 0) + 1
        super().send_response(code, message)

    def send_error_body(self, error: RequestError, headers: dict[str, str] | None = None) -> None:
        self.send_json(error.status, error.body(), headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own errors (malformed request lines and headers, unknown methods),
        as OpenAI-style JSON like every other answer."""
        self.close_connection = True
        # A request line too malformed to name a version leaves the default, HTTP/0.9, under which the
        # standard library writes a bare body: answer with status line and headers all the same.
        self.request_version = self.protocol_version
        headers = None
        if code == HTTPStatus.NOT_IMPLEMENTED:  # a method this server has no handler for
            code, message, headers = 405, f"method {self.command} is not allowed; use {ALLOWED_METHODS}", {"Allow": ALLOWED_METHODS}
        phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "error"
        self.send_error_body(RequestError(code, message or phrase), headers)

    def authorised(self) -> bool:
        key = self.server.api_key
        if not key:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.server.cors_origins or origin in self.server.cors_origins

    def check_caller(self) -> None:
        """Refuse what a web page could send to a loopback server: a foreign Host (DNS rebinding)
        or a foreign Origin (cross-site requests, which need no preflight as text/plain)."""
        host = self.headers.get("Host")
        names = self.server.host_names
        if names is not None and host is not None:
            name = urlsplit(f"//{host}").hostname or ""
            if name not in names:
                raise RequestError(421, f"this server answers to {', '.join(sorted(names))} (Host: {host[:100]})",
                                   code="misdirected_request")
        origin = self.headers.get("Origin")
        if origin is not None and not self.origin_allowed(origin):
            raise RequestError(403, f"cross-origin requests from {origin[:100]} are refused; start the server with "
                               "--cors-origin ORIGIN to allow them", code="origin_not_allowed")

    def read_json(self) -> Any:
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError(411, "chunked request bodies are not supported; send Content-Length")
        if len(lengths) != 1 or not (lengths[0].isascii() and lengths[0].isdigit()):
            self.close_connection = True  # where the body ends is unknown: the connection cannot be reused
            raise RequestError(411 if not lengths else 400, "exactly one Content-Length header with a byte count is required")
        length = int(lengths[0])
        if length > self.server.max_body_bytes:
            self.close_connection = True  # the body is not read, so the connection cannot be reused
            raise RequestError(413, f"the request body is {length} bytes; the limit is {self.server.max_body_bytes}")
        raw = self.rfile.read(length)
        self.connection.settimeout(IDLE_SECONDS)  # the reply's writes are not under the request's deadline
        if self.headers.get_content_type() != "application/json":
            raise RequestError(415, "the request body must be JSON, sent as Content-Type: application/json")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as err:  # malformed, undecodable, too deep, or a number too long
            raise RequestError(400, f"the request body is not valid JSON: {str(err)[:200]}") from None

    def route(self) -> str:
        return urlsplit(self.path).path

    # --- endpoints

    def do_OPTIONS(self) -> None:
        """CORS preflight: answered for the origins --cors-origin allows."""
        try:
            self.check_caller()
            if self.headers.get("Origin") is None:
                self.send_json(200, {}, {"Allow": ALLOWED_METHODS})
                return
            self.send_response(204)
            self.send_header("Access-Control-Allow-Methods", ALLOWED_METHODS)
            self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
            self.send_header("Access-Control-Max-Age", "600")
            self.send_header("Content-Length", "0")
            self.send_common_headers()
            self.end_headers()
        except RequestError as error:
            self.send_error_body(error)

    def do_GET(self) -> None:
        self.answer(self.get)

    def do_POST(self) -> None:
        self.answer(self.post)

    def answer(self, endpoint: Callable[[], None]) -> None:
        """Run an endpoint; every failure becomes a JSON answer (a 500 for the unexpected, logged)."""
        try:
            self.check_caller()
            endpoint()
        except RequestError as error:
            if not self.responded:
                self.send_error_body(error, {"Retry-After": "1"} if error.status == 503 else None)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            if not self.responded:
                self.send_error_body(RequestError(500, "internal error while answering; the server log has the "
                                                  "details", kind="server_error"))

    def get(self) -> None:
        route = self.route()
        if route == "/health":
            self.send_json(200, {"status": "ok"})
        elif not self.authorised():
            raise RequestError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key")
        elif route == "/v1/models":
            self.send_json(200, {"object": "list", "data": [
                {"id": self.server.model_id, "object": "model", "created": self.server.created, "owned_by": "sts-edge"}]})
        elif route == "/metrics":
            data = self.server.metrics.text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.send_common_headers()
            self.end_headers()
            self.wfile.write(data)
        else:
            raise RequestError(404, f"no route {route[:100]}", code="not_found")

    def post(self) -> None:
        routes = {"/v1/chat/completions": True, "/v1/completions": False}
        route = self.route()
        if route not in routes:
            self.close_connection = True
            raise RequestError(404, f"no route {route[:100]}", code="not_found")
        if not self.authorised():
            self.close_connection = True
            raise RequestError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key")
        chat = routes[route]
        body = self.read_json()
        prompt, options, response = parse_request(body, chat)
        if body.get("model") is not None and body["model"] not in self.server.model_names:
            raise RequestError(404, f"The model '{body['model'][:100]}' does not exist: this server runs "
                               f"'{self.server.model_id}' only (GET /v1/models)", param="model", code="model_not_found")
        self.complete(prompt, options, response, chat)

    def client_gone(self) -> bool:
        """Whether the client closed its end (a non-streaming request has nobody to answer)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def complete(self, prompt: Any, options: dict, response: dict, chat: bool) -> None:
        engine, stats, metrics = self.server.engine, GenerationStats(), self.server.metrics
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        with metrics.lock:
            if metrics.waiting > self.server.max_queue:
                raise RequestError(503, f"{metrics.waiting} requests are waiting for the model; retry shortly",
                                   kind="server_error", code="queue_full")
            metrics.waiting += 1
        try:
            with self.server.queue:
                self.generate(engine, stats, ident, prompt, options, response, chat)
        finally:
            with metrics.lock:
                metrics.waiting -= 1

    def generate(self, engine: Any, stats: GenerationStats, ident: str, prompt: Any, options: dict, response: dict,
                 chat: bool) -> None:
        if self.client_gone():  # it left while it waited its turn
            with self.server.metrics.lock:
                self.server.metrics.cancelled += 1
            self.close_connection = True
            return
        try:
            ids = list(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], int) else engine.encode(prompt)
            if not ids:
                raise RequestError(400, "the prompt is no tokens at all once tokenized; send some text", param="prompt")
            if max(ids) >= engine.target.config.vocab_size:
                raise RequestError(400, f"token id {max(ids)} is outside the vocabulary ({engine.target.config.vocab_size})", param="prompt")
            pieces = engine.stream(ids, stats=stats, **{**self.server.defaults, **options})
            first = next(pieces)  # errors about the prompt or the settings surface here, before any reply
        except (ContextLengthError, MaskPolicyError, ChatTemplateError, ValueError) as err:
            code = "context_length_exceeded" if isinstance(err, ContextLengthError) else None
            raise RequestError(400, str(err), code=code) from None
        except StsEdgeError as err:
            raise RequestError(500, str(err), kind="server_error") from None
        try:
            if response["stream"]:
                self.stream_events(ident, first, pieces, stats, len(ids), chat, response["include_usage"])
            else:
                text = [first]
                for piece in pieces:
                    if self.client_gone():  # cancelled at the next token: the model is free for the next request
                        with self.server.metrics.lock:
                            self.server.metrics.cancelled += 1
                        self.close_connection = True
                        return
                    text.append(piece)
                self.send_json(200, self.full_response(ident, "".join(text), stats, len(ids), chat))
        finally:
            pieces.close()
            self.server.metrics.finished(stats, len(ids))

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
        self.send_common_headers()
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
        except (BrokenPipeError, ConnectionResetError):  # the client left: generation stops when the stream is closed
            with self.server.metrics.lock:
                self.server.metrics.cancelled += 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sts-server",
        description="OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, /health) "
        "for a target model with an optional draft. " + STS_TRADE,
        formatter_class=HelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY'; prefer setting $STS_EDGE_API_KEY, which other "
                        "users of this machine cannot read from the process list (default: $STS_EDGE_API_KEY; unset "
                        "means open)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="allow browser requests from this origin, e.g. http://localhost:3000 (repeatable; '*' "
                        "allows every site, which lets any web page you visit use the server); other origins are refused")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="largest request body accepted")
    parser.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                        help="requests that may wait for the model; more are answered 503 with Retry-After")
    add_gamma_argument(parser)
    add_policy_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.api_key is not None:
        print("warning: --api-key shows in the process list to every user of this machine; set STS_EDGE_API_KEY instead",
              file=sys.stderr)
    api_key = args.api_key or os.environ.get("STS_EDGE_API_KEY")
    try:
        engine = load_from_args(args)
    except (StsEdgeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    # Answers name the model as the user did (an alias, or a directory's name), never a local path.
    given = Path(str(args.model)).expanduser()
    model_id = given.resolve().name if given.is_dir() else str(args.model)
    server = CompletionServer((args.host, args.port), engine, model_id, api_key=api_key,
                              max_body_bytes=args.max_body_bytes, defaults={"gamma": args.gamma},
                              aliases=(str(args.model), str(given.resolve())), cors_origins=tuple(args.cors_origin),
                              max_queue=args.max_queue)
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
