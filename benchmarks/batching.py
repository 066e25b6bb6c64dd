"""Dynamic batching benchmark on the transformer encoder: concurrency 64 with batching on and off, beside
in-process onnxruntime at the batch size the server formed.

Usage (run by hand, not a test):
    .venv/bin/python benchmarks/batching.py [--write docs/batching.md]
"""

# ruff: noqa: T201
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from serving import Point, free_port, run_point, table  # noqa: E402

TRANSFORMER = REPO / "models" / "tiny_transformer.onnx"


def body(rng: np.random.Generator, tokens: int) -> bytes:
    ids = rng.integers(1, 1000, (1, tokens)).astype(np.int64)
    return orjson.dumps({"inputs": [
        {"name": "input_ids", "shape": [1, tokens], "datatype": "INT64", "data": ids.ravel().tolist()},
        {"name": "attention_mask", "shape": [1, tokens], "datatype": "INT64", "data": [1] * tokens}]})


def batch_sizes(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics").text
    count = total = 0.0
    for line in text.splitlines():
        if line.startswith("slimserve_batch_size_count{") and 'model="encoder"' in line:
            count = float(line.rsplit(" ", 1)[1])
        if line.startswith("slimserve_batch_size_sum{") and 'model="encoder"' in line:
            total = float(line.rsplit(" ", 1)[1])
    return count, total


def inprocess(batch: int, tokens: int, threads: int, seconds: float = 3.0) -> Point:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(TRANSFORMER), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(1, 1000, (batch, tokens)).astype(np.int64),
             "attention_mask": np.ones((batch, tokens), np.int64)}
    latencies = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        session.run(None, feeds)
        latencies.append((time.perf_counter() - t0) * 1e3)
    return Point(f"onnxruntime in-process, batch {batch}", batch, 1, len(latencies), time.perf_counter() - started,
                 latencies, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=6400)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128, help="sequence length of every request")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    port = free_port()
    data_dir = tempfile.mkdtemp(prefix="slimserve-batching-")
    env = {**os.environ, "SLIMSERVE_DATA_DIR": data_dir, "SLIMSERVE_PORT": str(port),
           "SLIMSERVE_INTRA_OP_THREADS": str(args.threads),
           "SLIMSERVE_PRELOAD_MODELS": json.dumps({"encoder": {"file": str(TRANSFORMER)}})}
    server = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "app", "serve"], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    os.sched_setaffinity(0, {1})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        payload = body(np.random.default_rng(0), args.tokens)
        path = "/v2/models/encoder/infer"
        point_on = asyncio.run(run_point("127.0.0.1", port, path, payload, concurrency=args.concurrency,
                                         requests=args.requests, warmup=640, label="batching on", batch=1))
        calls, rows = batch_sizes(url)
        httpx.put(f"{url}/models/encoder/batching", json={"enabled": False})
        time.sleep(1.5)
        point_off = asyncio.run(run_point("127.0.0.1", port, path, payload, concurrency=args.concurrency,
                                          requests=args.requests, warmup=640, label="batching off", batch=1))
    finally:
        server.terminate()
        server.wait(timeout=30)
    formed = rows / calls if calls else 1.0
    ceiling = inprocess(max(int(round(formed)), 1), args.tokens, args.threads)
    lines = [
        "# Dynamic batching", "",
        f"Transformer encoder (`models/tiny_transformer.onnx`), batch-1 requests of {args.tokens} tokens, concurrency "
        f"{args.concurrency}, server pinned to CPU 0 ({args.threads} intra-op thread), client on CPU 1, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
        table([point_on, point_off, ceiling]), "",
        f"Batches formed with batching on: {rows / max(calls, 1):.1f} rows per onnxruntime call on average "
        f"({int(calls)} calls, warm-up included).", "",
        f"- batching on / off throughput: **{point_on.rps / point_off.rps:.2f}×** (target ≥ 2×)",
        f"- batching on / in-process onnxruntime at batch {max(int(round(formed)), 1)}: "
        f"**{point_on.rps / (ceiling.rps * ceiling.batch):.2f}** of its rows/s (target ≥ 0.70)",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        args.write.write_text(report + "\n")


if __name__ == "__main__":
    main()
