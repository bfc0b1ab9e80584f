"""The server's own overhead on loopback, with Nagle's algorithm (as it once ran) and with
TCP_NODELAY (as it runs): a request on a kept-alive connection against one on a new connection, and
a 1-token completion through the openai client, which keeps its connection alive.

    python scripts/bench_server.py --model DIR [--requests 50] [--out benchmarks/results/server_cpu.json]

A random tiny model stands in when --model is not given: the figures are the HTTP layer's, not
the model's. Medians in milliseconds.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def median_ms(timings: list[float]) -> float:
    return round(statistics.median(timings) * 1000, 3)


def measure(engine, nodelay: bool, requests: int) -> dict[str, float]:
    from openai import OpenAI

    from sts_edge.server import CompletionServer, Handler

    Handler.disable_nagle_algorithm = nodelay
    server = CompletionServer(("127.0.0.1", 0), engine, "bench", quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    kept, fresh, completions = [], [], []
    connection = http.client.HTTPConnection(host, port)
    for _ in range(requests):
        start = time.perf_counter()
        connection.request("GET", "/health")
        connection.getresponse().read()
        kept.append(time.perf_counter() - start)
        start = time.perf_counter()
        other = http.client.HTTPConnection(host, port)
        other.request("GET", "/health")
        other.getresponse().read()
        other.close()
        fresh.append(time.perf_counter() - start)
    client = OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0)
    for _ in range(requests):
        start = time.perf_counter()
        client.completions.create(model="bench", prompt="The lighthouse", max_tokens=1, temperature=0)
        completions.append(time.perf_counter() - start)
    server.shutdown()
    server.server_close()
    Handler.disable_nagle_algorithm = True
    return {"health_kept_alive_ms": median_ms(kept), "health_new_connection_ms": median_ms(fresh),
            "one_token_completion_openai_client_ms": median_ms(completions)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory or alias (default: a random tiny model)")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--out", help="JSON output")
    args = parser.parse_args(argv)

    from sts_edge import load

    if args.model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from fixtures.models import make_model_dir

        args.model = make_model_dir(Path(tempfile.mkdtemp()) / "tiny", "llama3", seed=0)
    engine = load(args.model, backend="torch-cpu", calibration=None, max_seq_len=256)
    runs = {"with_nagle": measure(engine, nodelay=False, requests=args.requests),  # the server before TCP_NODELAY
            "tcp_nodelay": measure(engine, nodelay=True, requests=args.requests)}  # as it runs

    record = {
        "date": datetime.date.today().isoformat(), "machine": platform.platform(), "model": str(args.model),
        "requests": args.requests, **runs,
    }
    print(json.dumps(record, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
