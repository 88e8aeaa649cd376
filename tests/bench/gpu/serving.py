#!/usr/bin/env python3
"""Serving on one NVIDIA GPU: generated tokens/s of graft-server (built with `--features
cuda`) with 1, 8 and 32 distinct adapters in the batch against the base model alone (the same
load: `--clients` concurrent clients), and hot-load latency of a rank-16 adapter from local disk
(admin PUT until the server answers it serves). Model and adapters from make_model.py:

    python tests/bench/gpu/make_model.py --out $MODEL --trainer $TRAINER --adapters 32
    python tests/bench/gpu/serving.py --model $MODEL --server $SERVER

Targets (issue 8): 32 adapters ≥ 70% of base-only tokens/s; hot-load p99 < 1 s.
"""

import argparse
import hashlib
import json
import os
import secrets
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request


def request(url: str, body=None, method="GET", token=None, timeout=600):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def throughput(base: str, models: list[str], clients: int, seconds: float, max_tokens: int) -> float:
    tokens, stop, lock = [0], time.monotonic() + seconds, threading.Lock()

    def client(i: int) -> None:
        n = i
        while time.monotonic() < stop:
            body = {"model": models[n % len(models)], "prompt": "the quick brown fox",
                    "max_tokens": max_tokens, "temperature": 0}
            got = request(f"{base}/v1/completions", body)["usage"]["completion_tokens"]
            with lock:
                tokens[0] += got
            n += clients

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens[0] / (time.monotonic() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--server", required=True, help="graft-server built with --features cuda")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()

    adapters_dir = os.path.join(args.model, "adapters")
    names = sorted(os.listdir(adapters_dir))
    assert len(names) >= 32, "make_model.py --adapters 32 first"
    work = tempfile.mkdtemp(prefix="graft-gpu-serve-")
    token = secrets.token_hex(16)
    token_file = os.path.join(work, "token")
    with open(token_file, "w") as f:
        f.write(token)
    base = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([
        args.server, "--model", f"file://{args.model}", "--listen", f"127.0.0.1:{args.port}",
        "--admin-token-file", token_file, "--cache-dir", os.path.join(work, "cache"),
        "--device", "cuda", "--max-batch-size", str(args.clients), "--max-lora-rank", "16",
        "--max-loaded-adapters", "64", "--max-model-len", "2048",
    ])
    try:
        for _ in range(1200):
            try:
                urllib.request.urlopen(f"{base}/readyz", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        served = request(f"{base}/v1/models")["data"][0]["id"]

        latencies = []
        for name in names[:32]:
            path = os.path.join(adapters_dir, name)
            version = {"uri": f"file://{path}/", "sha256": sha256(os.path.join(path, "adapter_model.safetensors")),
                       "weight": 100}
            start = time.perf_counter()
            request(f"{base}/admin/adapters/{name}", {"versions": [version]}, "PUT", token)
            latencies.append(time.perf_counter() - start)

        rates = {}
        for label, models in [("base only", [served]), ("1 adapter", names[:1]),
                              ("8 adapters", names[:8]), ("32 adapters", names[:32])]:
            rates[label] = throughput(base, models, args.clients, args.seconds, args.max_tokens)
    finally:
        server.terminate()
        server.wait()

    print(f"device: {subprocess.run(['nvidia-smi', '--query-gpu=name', '--format=csv,noheader'], capture_output=True, text=True).stdout.strip()}")
    print(f"{args.clients} clients x {args.max_tokens} tokens, {args.seconds:.0f} s each")
    for label, rate in rates.items():
        print(f"{label:14}{rate:10.0f} tokens/s  ({rate / rates['base only']:.2f} of base)")
    latencies.sort()
    print(f"hot-load rank-16 from local disk, {len(latencies)} adapters: "
          f"p50 {statistics.median(latencies) * 1000:.0f} ms, p99 {latencies[int(0.99 * (len(latencies) - 1))] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
