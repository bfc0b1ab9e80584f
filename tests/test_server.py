"""The OpenAI-compatible server, through the official openai client and through hostile raw requests."""

import http.client
import json
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
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
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
