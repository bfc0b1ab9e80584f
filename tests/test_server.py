"""The OpenAI-compatible server, through the official openai client and through hostile raw requests."""

import http.client
import json
import select
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import APIStatusError, OpenAI

from sts_edge import load
from sts_edge.server import CompletionServer

MESSAGES = [{"role": "user", "content": "Tell me about the lighthouse keeper."}]


@pytest.fixture(scope="module")
def engine(model_dirs, draft_dir):
    return load(model_dirs["llama3"], draft=draft_dir, backend="torch-cpu", calibration=None, max_seq_len=256)


@pytest.fixture(scope="module")
def server(engine):
    srv = CompletionServer(("127.0.0.1", 0), engine, "tiny-llama", quiet=True, max_body_bytes=64_000)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def client(server):
    host, port = server.server_address[:2]
    return OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0, timeout=120)


def raw_request(server, method, path, body=b"", headers=None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data) if data else None


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (0.9, 7)])
def test_chat_completions_equal_the_python_api(client, engine, temperature, seed):
    expected = engine.generate(MESSAGES, max_tokens=12, temperature=temperature, seed=seed)
    reply = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=12,
                                           temperature=temperature, seed=seed)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.completion_tokens == len(expected.tokens)
    assert reply.usage.prompt_tokens == len(engine.encode(MESSAGES))
    stream = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=12, temperature=temperature,
                                            seed=seed, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.tokens)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [reply.choices[0].finish_reason]


def test_completions_and_stop_strings(client, engine):
    expected = engine.generate("The old lighthouse", max_tokens=10, temperature=0.7, seed=3)
    reply = client.completions.create(model="tiny-llama", prompt="The old lighthouse", max_tokens=10, temperature=0.7, seed=3)
    assert reply.choices[0].text == expected.text
    streamed = client.completions.create(model="tiny-llama", prompt="The old lighthouse", max_tokens=10,
                                         temperature=0.7, seed=3, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected.text
    full = engine.generate("The old lighthouse", max_tokens=10, temperature=0).text
    stop = full[3:5]
    cut = client.completions.create(model="tiny-llama", prompt="The old lighthouse", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == ["tiny-llama"]
    assert raw_request(server, "GET", "/health") == (200, {"status": "ok"})


@pytest.mark.parametrize("body,status,fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"max_tokens": 5}).encode(), 400, "'messages' is required"),
    (json.dumps({"messages": "hello"}).encode(), 400, "'messages' must be"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "role"),
    (json.dumps({"messages": [{"role": "user", "content": 42}]}).encode(), 400, "content"),
    (json.dumps({"messages": MESSAGES, "max_tokens": -1}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": MESSAGES, "max_tokens": "ten"}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": MESSAGES, "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"messages": MESSAGES, "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({"messages": MESSAGES, "n": 3}).encode(), 400, "'n'"),
    (json.dumps({"messages": MESSAGES, "bogus_field": 1}).encode(), 400, "Unrecognized request argument"),
    (json.dumps({"messages": MESSAGES, "policy": "magic"}).encode(), 400, "policy"),
    (json.dumps({"messages": MESSAGES, "budget": 0}).encode(), 400, "budget"),
    (json.dumps({"messages": MESSAGES, "candidates": 0}).encode(), 400, "candidates"),
    (json.dumps({"messages": MESSAGES, "candidates": 2.5}).encode(), 400, "candidates"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 400}]}).encode(), 400, "KV cache"),
    (b"x" * 70_000, 413, "limit"),
])
def test_malformed_and_hostile_requests_get_4xx(server, client, body, status, fragment):
    got_status, payload = raw_request(server, "POST", "/v1/chat/completions", body)
    assert got_status == status
    assert fragment in payload["error"]["message"]
    assert payload["error"]["type"] == "invalid_request_error"
    # and the server keeps serving
    assert client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=2).choices[0].message.content is not None


def test_wrong_route_and_missing_length(server):
    assert raw_request(server, "POST", "/v1/embeddings", b"{}")[0] == 404
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert b" 411 " in sock.recv(4096).split(b"\r\n")[0] + b" "


def test_context_error_code(server):
    status, payload = raw_request(server, "POST", "/v1/completions", json.dumps({"prompt": list(range(300))}).encode())
    assert status == 400 and payload["error"]["code"] == "context_length_exceeded"


def test_concurrent_burst_is_queued_and_answers_stay_separate(client, engine):
    prompts = [f"Question number {i}: where is the lighthouse?" for i in range(8)]
    expected = [engine.generate([{"role": "user", "content": p}], max_tokens=8, temperature=0).text for p in prompts]

    def ask(prompt):
        reply = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": prompt}],
                                               max_tokens=8, temperature=0)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == expected
    assert len(set(expected)) > 1  # different prompts, different answers: a mix-up would show


def test_api_key_is_enforced(engine):
    srv = CompletionServer(("127.0.0.1", 0), engine, "tiny-llama", api_key="s3cret", quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        host, port = srv.server_address[:2]
        wrong = OpenAI(base_url=f"http://{host}:{port}/v1", api_key="guess", max_retries=0)
        with pytest.raises(APIStatusError) as denied:
            wrong.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=2)
        assert denied.value.status_code == 401
        right = OpenAI(base_url=f"http://{host}:{port}/v1", api_key="s3cret", max_retries=0)
        assert right.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=2).choices
        assert raw_request(srv, "GET", "/health")[0] == 200  # health needs no key
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_model_the_server_does_not_run_is_404(server, client):
    status, payload = raw_request(server, "POST", "/v1/chat/completions",
                                  json.dumps({"model": "qwen-7b", "messages": MESSAGES}).encode())
    assert status == 404 and payload["error"]["code"] == "model_not_found" and "tiny-llama" in payload["error"]["message"]
    assert client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=2).choices


def test_server_command_names_the_model_as_given_not_by_its_path(model_dirs):
    import subprocess
    import sys

    model_dir = model_dirs["smollm2"]
    process = subprocess.Popen([sys.executable, "-m", "sts_edge.server", "--model", str(model_dir), "--port", "0",
                                "--backend", "torch-cpu", "--max-seq-len", "128"], stderr=subprocess.PIPE, text=True)
    try:
        banner = process.stderr.readline()
        assert banner.startswith(f"sts-edge serving {model_dir.name} on http://127.0.0.1:"), banner
        port = int(banner.split("127.0.0.1:")[1].split("/")[0])
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == [model_dir.name]
        reply = client.completions.create(model=str(model_dir), prompt="The harbour", max_tokens=2)
        assert reply.model == model_dir.name and str(model_dir.parent) not in reply.model_dump_json()
    finally:
        process.terminate()
        process.wait(timeout=60)


# --- hostile and careless clients ----------------------------------------------------------------


def raw_exchange(server, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; (status, headers, body) of the one reply, read until the server closes or the
    body is complete."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(data)
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed without a reply: {reply!r}"
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            chunk = sock.recv(65536)
            assert chunk, "the server closed inside its reply"
            body += chunk
    return int(lines[0].split()[1]), headers, body


def post_bytes(path: str, body: bytes | str, *, content_type: str = "application/json", host: str = "127.0.0.1",
               extra: str = "") -> bytes:
    body = body.encode() if isinstance(body, str) else body
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"{extra}\r\n").encode() + body


REPRODUCERS = {  # each a request that once got no reply, or the wrong one; the status it must get
    "lone surrogate": (post_bytes("/v1/completions", '{"prompt": "\\ud800"}'), 400),
    "lone surrogate in a message": (post_bytes("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}]}'), 400),
    "5000-digit seed": (post_bytes("/v1/completions", '{"prompt": "w1", "seed": ' + "9" * 5000 + "}"), 400),
    "JSON nested 30000 deep": (post_bytes("/v1/completions", "[" * 30_000 + "]" * 30_000), 400),
    "budget 2^70": (post_bytes("/v1/completions", '{"prompt": "w1", "budget": 1180591620717411303424}'), 400),
    "superscript Content-Length": (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: \xc2\xb2\r\n\r\n{}", 400),
    "two Content-Lengths": (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 2\r\nContent-Length: 30\r\n\r\n{}", 400),
    "n true": (post_bytes("/v1/completions", '{"prompt": "w1", "n": true}'), 400),
    "include_usage a string": (post_bytes("/v1/completions", '{"prompt": "w1", "stream": true, "stream_options": '
                                          '{"include_usage": "no"}}'), 400),
    "penalty false": (post_bytes("/v1/completions", '{"prompt": "w1", "presence_penalty": false}'), 400),
    "text/plain body": (post_bytes("/v1/completions", '{"prompt": "w1", "max_tokens": 1}', content_type="text/plain"), 415),
    "foreign Host": (post_bytes("/v1/completions", '{"prompt": "w1", "max_tokens": 1}', host="attacker.example"), 421),
    "foreign Origin": (post_bytes("/v1/completions", '{"prompt": "w1", "max_tokens": 1}',
                                  extra="Origin: http://attacker.example\r\n"), 403),
    "PUT": (b"PUT /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n", 405),
    "a malformed request line": (b"GET\r\n\r\n", 400),
}


@pytest.mark.parametrize("name", REPRODUCERS)
def test_every_hostile_request_gets_its_json_answer(server, client, name):
    request, status = REPRODUCERS[name]
    got, headers, body = raw_exchange(server, request)
    assert got == status, body
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["message"]
    if status == 405:
        assert "POST" in headers["allow"]
    assert client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=2).choices  # still serving


def test_query_strings_and_tiny_temperatures(server, engine):
    assert raw_request(server, "GET", "/health?x=1") == (200, {"status": "ok"})
    greedy = engine.generate("w1 w2", max_tokens=6, temperature=0).text
    status, payload = raw_request(server, "POST", "/v1/completions",
                                  json.dumps({"prompt": "w1 w2", "max_tokens": 6, "temperature": 5e-324}).encode())
    assert status == 200 and payload["choices"][0]["text"] == greedy


@pytest.mark.parametrize("template,fragment", [
    ("{{ raise_exception('Conversation roles must alternate user/assistant') }}", "roles must alternate"),
    ("{{ messages.append(1) }}", "refused"),  # the sandbox
    ("{{ nothing.attribute }}", "refused"),  # an undefined name
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "more than"),  # a runaway template
    ("{% if false %}x{% endif %}", "no tokens"),  # a prompt of no tokens at all
    (None, "no chat template"),
])
def test_chat_template_failures_are_400_and_name_no_path(server, engine, model_dirs, template, fragment):
    original = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = template
    try:
        status, payload = raw_request(server, "POST", "/v1/chat/completions",
                                      json.dumps({"messages": MESSAGES, "max_tokens": 2}).encode())
    finally:
        engine.tokenizer.chat_template = original
    assert status == 400 and fragment in payload["error"]["message"]
    assert str(model_dirs["llama3"].parent) not in payload["error"]["message"]


def test_cors_origins_the_server_allows(engine):
    srv = CompletionServer(("127.0.0.1", 0), engine, "tiny-llama", quiet=True, cors_origins=("http://localhost:3000",))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        allowed = "Origin: http://localhost:3000\r\n"
        status, headers, _ = raw_exchange(srv, post_bytes("/v1/completions", '{"prompt": "w1", "max_tokens": 1}', extra=allowed))
        assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
        preflight = (f"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n{allowed}"
                     "Access-Control-Request-Method: POST\r\n\r\n").encode()
        status, headers, _ = raw_exchange(srv, preflight)
        assert status == 204 and "POST" in headers["access-control-allow-methods"]
        foreign = preflight.replace(b"localhost:3000", b"attacker.example")
        assert raw_exchange(srv, foreign)[0] == 403
    finally:
        srv.shutdown()
        srv.server_close()


def metric(server, name: str) -> float:
    status, headers, body = raw_exchange(server, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = [line.split()[-1] for line in body.decode().splitlines() if line.startswith(name + " ")]
    return float(values[0])


def test_an_abandoned_request_is_cancelled_and_the_queue_is_bounded(engine):
    import time

    srv = CompletionServer(("127.0.0.1", 0), engine, "tiny-llama", quiet=True, max_queue=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    host, port = srv.server_address[:2]
    long_request = post_bytes("/v1/completions", '{"prompt": "w1 w2", "max_tokens": 200, "temperature": 0}')
    try:
        # A client that leaves while its request waits for the model: it is dropped, never generated.
        srv.queue.acquire()  # the model is busy
        leaving = socket.create_connection((host, port))
        leaving.sendall(long_request)
        for _ in range(600):  # it is queued: max_queue 0 leaves no room for another
            if metric(srv, "sts_edge_queue_depth") == 1:
                break
            time.sleep(0.05)
        status, headers, body = raw_exchange(srv, long_request)
        assert status == 503 and headers["retry-after"] == "1" and json.loads(body)["error"]["code"] == "queue_full"
        leaving.close()
        before = metric(srv, "sts_edge_generated_tokens_total")
        srv.queue.release()
        for _ in range(600):
            if metric(srv, "sts_edge_requests_cancelled_total") == 1:
                break
            time.sleep(0.05)
        assert metric(srv, "sts_edge_requests_cancelled_total") == 1
        assert metric(srv, "sts_edge_generated_tokens_total") - before < 200
        assert raw_exchange(srv, post_bytes("/v1/completions", '{"prompt": "w1", "max_tokens": 2}'))[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


def test_slow_headers_and_surplus_connections_are_refused(engine, monkeypatch):
    import time

    from sts_edge import server as server_module

    monkeypatch.setattr(server_module, "REQUEST_SECONDS", 1.0)
    srv = CompletionServer(("127.0.0.1", 0), engine, "tiny-llama", quiet=True, max_connections=2)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    host, port = srv.server_address[:2]
    try:
        # One header line now and then: the whole request has REQUEST_SECONDS, not each line.
        with socket.create_connection((host, port), timeout=30) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\n")
            closed = False
            for i in range(40):
                try:
                    slow.sendall(f"X-Line-{i}: x\r\n".encode())
                except OSError:
                    closed = True
                    break
                readable, _, _ = select.select([slow], [], [], 0.25)
                if readable and slow.recv(4096) == b"":
                    closed = True
                    break
            assert closed
        # Two idle connections hold both threads: a third is told 503 at once, and closed.
        idle = [socket.create_connection((host, port), timeout=30) for _ in range(2)]
        time.sleep(0.2)
        status, headers, _ = raw_exchange(srv, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status == 503 and headers["retry-after"] == "1"
        for sock in idle:
            sock.close()
    finally:
        srv.shutdown()
        srv.server_close()


def fuzz_cases():
    """(path, body): a valid request (a prompt, or one user message) with up to three fields set to
    values valid or not, request fields or arbitrary keys, the prompt or messages themselves included."""
    from hypothesis import strategies as st

    from sts_edge.server import COMMON_FIELDS

    values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=8)
    field_values = st.one_of(st.integers(-2, 300), st.floats(0, 2.5), st.booleans(), st.none(), st.text(max_size=8),
                             st.sampled_from(["sts", "dense", "streaming", "oracle", "quest"]), values)
    keys = st.sampled_from(sorted(COMMON_FIELDS) + ["prompt", "messages"]) | st.text(max_size=8)
    return st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), st.text(min_size=1, max_size=24),
                     st.dictionaries(keys, field_values, max_size=3))


def test_fuzzed_requests_all_get_well_formed_answers_and_change_nothing(server, engine):
    """A few hundred generated requests to both endpoints: each is answered with a JSON body (or an
    event stream), none with a 5xx, and a fixed greedy request answers the same before and after."""
    from hypothesis import HealthCheck, given, settings

    fixed = json.dumps({"prompt": "The lighthouse keeper", "max_tokens": 8, "temperature": 0}).encode()
    before = raw_request(server, "POST", "/v1/completions", fixed)[1]["choices"]

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(fuzz_cases())
    def check(case):
        path, text, fields = case
        body = {"prompt": text} if path == "/v1/completions" else {"messages": [{"role": "user", "content": text}]}
        body.update(fields)
        for field in ("max_tokens", "max_completion_tokens"):  # keep generations short
            if type(body.get(field)) is int and body[field] > 4:
                body[field] = 4
        body.setdefault("max_tokens", 3)
        status, headers, data = raw_exchange(server, post_bytes(path, json.dumps(body)))
        assert status < 500, data
        if headers["content-type"] == "text/event-stream":
            assert status == 200 and data == b"" or data.startswith(b"data: ")
        else:
            assert headers["content-type"] == "application/json"
            payload = json.loads(data)
            assert ("error" in payload) == (status != 200)

    check()
    assert raw_request(server, "POST", "/v1/completions", fixed)[1]["choices"] == before


def test_a_request_whose_client_leaves_mid_generation_stops_at_the_next_token(engine, monkeypatch):
    import time

    srv = CompletionServer(("127.0.0.1", 0), engine, "tiny-llama", quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    host, port = srv.server_address[:2]
    started, left = threading.Event(), threading.Event()
    real_stream = engine.stream

    def stream(*args, **kwargs):  # the engine's own generation, held after its first piece until the client left
        pieces = real_stream(*args, **kwargs)
        yield next(pieces)
        started.set()
        left.wait(60)
        yield from pieces

    monkeypatch.setattr(engine, "stream", stream)
    try:
        client = socket.create_connection((host, port))
        client.sendall(post_bytes("/v1/completions", '{"prompt": "w1 w2", "max_tokens": 200, "temperature": 0}'))
        assert started.wait(60)
        client.close()
        left.set()
        for _ in range(600):
            if metric(srv, "sts_edge_requests_cancelled_total") == 1:
                break
            time.sleep(0.05)
        assert metric(srv, "sts_edge_requests_cancelled_total") == 1
        assert metric(srv, "sts_edge_generated_tokens_total") < 200
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_chat_template_that_runs_too_long_is_stopped(server, engine, monkeypatch):
    """A render has MAX_TEMPLATE_SECONDS: a loop of 3 * 10^8 empty iterations (minutes unbounded) is
    stopped at a range() call and answered 400."""
    from sts_edge import tokenizer

    monkeypatch.setattr(tokenizer, "MAX_TEMPLATE_SECONDS", 0.5)
    monkeypatch.setattr(engine.tokenizer, "chat_template",
                        "{% for i in range(100000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}")
    status, payload = raw_request(server, "POST", "/v1/chat/completions",
                                  json.dumps({"messages": MESSAGES, "max_tokens": 2}).encode())
    assert status == 400 and "ran for more than 0.5 s" in payload["error"]["message"]
