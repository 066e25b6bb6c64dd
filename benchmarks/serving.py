"""Serving benchmark: closed-loop load against a SlimServe server, beside in-process onnxruntime (the ceiling).

Usage (run by hand, not a test):
    .venv/bin/python benchmarks/serving.py                      # starts its own server on the digits CNN
    .venv/bin/python benchmarks/serving.py --url http://127.0.0.1:8000 --model digits
    .venv/bin/python benchmarks/serving.py --write docs/performance.md

The client is a minimal HTTP/1.1 keep-alive client on asyncio streams: general-purpose Python clients
(httpx) saturate below what the server does, so they would measure themselves.
"""

# ruff: noqa: T201
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.runtime import codecs  # noqa: E402
from app.runtime.datatypes import TensorSpec  # noqa: E402

DEFAULT_MODEL = REPO / "models" / "digits_cnn.onnx"
DEFAULT_SAMPLES = REPO / "models" / "digits_cnn.samples.npz"


@dataclass
class Point:
    target: str
    batch: int
    concurrency: int
    requests: int
    seconds: float
    latencies_ms: list[float]
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


class Connection:
    """One keep-alive HTTP/1.1 connection; enough of the protocol for Content-Length answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def post(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self.reader.readexactly(length)
        return status, body

    def close(self) -> None:
        self.writer.close()


def build_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{key}: {value}\r\n" for key, value in (headers or {"Content-Type": "application/json"}).items())
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def run_point(
    host: str, port: int, path: str, body: bytes, *, concurrency: int, requests: int, warmup: int, label: str,
    batch: int, headers: dict[str, str] | None = None,
) -> Point:
    request = build_request(host, port, path, body, headers)
    connections = [await Connection.open(host, port) for _ in range(concurrency)]
    latencies: list[float] = []
    errors = 0

    async def worker(conn: Connection, count: int, record: bool) -> None:
        nonlocal errors
        for _ in range(count):
            started = time.perf_counter()
            status, _ = await conn.post(request)
            if record:
                latencies.append((time.perf_counter() - started) * 1e3)
            if status != 200:
                errors += 1

    per = max(warmup // concurrency, 1)
    await asyncio.gather(*(worker(c, per, False) for c in connections))
    per = requests // concurrency
    started = time.perf_counter()
    await asyncio.gather(*(worker(c, per, True) for c in connections))
    seconds = time.perf_counter() - started
    for conn in connections:
        conn.close()
    return Point(label, batch, concurrency, per * concurrency, seconds, latencies, errors)


def v2_body(name: str, rows: np.ndarray) -> bytes:
    return orjson.dumps({"inputs": [{"name": name, "shape": list(rows.shape), "datatype": "FP32",
                                     "data": rows.ravel().tolist()}]})


def inprocess_points(model: Path, input_name: str, samples: np.ndarray, batches: list[int], threads: int,
                     seconds: float = 2.0) -> list[Point]:
    """The ceiling: session.run alone, and session.run plus SlimServe's own V2 decode/encode."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    spec = {input_name: TensorSpec(input_name, "FP32", (-1, *samples.shape[1:]))}
    limits = codecs.Limits(max_batch_size=1 << 20, max_tensor_elements=1 << 30)
    points = []
    for batch in batches:
        rows = samples[:batch]
        body = v2_body(input_name, rows)
        for label, with_codec in (("onnxruntime in-process", False), ("onnxruntime + V2 JSON codec", True)):
            latencies = []
            deadline = time.perf_counter() + seconds
            count = 0
            started = time.perf_counter()
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                if with_codec:
                    request = codecs.decode_v2(body, None, spec, limits)
                    outputs = session.run(None, request.inputs)
                    codecs.encode_v2(model="m", variant="original", request=request, names=["logits"],
                                     results=outputs, specs={})
                else:
                    session.run(None, {input_name: rows})
                latencies.append((time.perf_counter() - t0) * 1e3)
                count += 1
            points.append(Point(label, batch, 1, count, time.perf_counter() - started, latencies, 0))
    return points


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(model: Path, samples: Path, cpu: str | None, threads: int) -> tuple[subprocess.Popen[bytes], int, str]:
    port = free_port()
    data_dir = tempfile.mkdtemp(prefix="slimserve-bench-")
    env = {**os.environ, "SLIMSERVE_DATA_DIR": data_dir, "SLIMSERVE_PORT": str(port),
           "SLIMSERVE_INTRA_OP_THREADS": str(threads),
           "SLIMSERVE_PRELOAD_MODELS": json.dumps({"bench": {"file": str(model), "samples": str(samples)}})}
    command = [sys.executable, "-m", "app", "serve"]
    if cpu is not None and shutil.which("taskset"):
        command = ["taskset", "-c", cpu, *command]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    time.sleep(1.0)
    return process, port, data_dir


def check_first_answer(host: str, port: int, path: str, body: bytes, expected: np.ndarray) -> float:
    async def once() -> bytes:
        conn = await Connection.open(host, port)
        status, payload = await conn.post(build_request(host, port, path, body))
        conn.close()
        if status != 200:
            raise SystemExit(f"server answered {status}: {payload[:300]!r}")
        return payload

    answer = orjson.loads(asyncio.run(once()))
    got = np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(expected.shape)
    return float(np.max(np.abs(got - expected)))


def table(points: list[Point]) -> str:
    lines = ["| target | batch | conc | req/s | rows/s | p50 ms | p90 ms | p99 ms | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        lines.append(f"| {p.target} | {p.batch} | {p.concurrency} | {p.rps:,.0f} | {p.rps * p.batch:,.0f} | "
                     f"{p.pct(50):.3f} | {p.pct(90):.3f} | {p.pct(99):.3f} | {p.errors} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="benchmark a running server instead of starting one")
    parser.add_argument("--model", default="bench", help="model name on the server")
    parser.add_argument("--onnx", type=Path, default=DEFAULT_MODEL, help="the same model file, for the ceiling")
    parser.add_argument("--samples", type=Path, default=DEFAULT_SAMPLES)
    parser.add_argument("--input-name", default="input")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (server and ceiling)")
    parser.add_argument("--server-cpu", default="0", help="CPU list to pin a started server to ('' for none)")
    parser.add_argument("--client-cpu", default="1", help="CPU list to pin this client to ('' for none)")
    parser.add_argument("--write", type=Path, help="append the tables to this markdown file")
    args = parser.parse_args()

    samples = np.load(args.samples)[args.input_name].astype(np.float32)
    batches = [int(b) for b in args.batches.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    process = None
    data_dir = None
    if args.url:
        host, _, port_text = args.url.removeprefix("http://").rstrip("/").partition(":")
        port = int(port_text or 80)
    else:
        process, port, data_dir = start_server(args.onnx, args.samples, args.server_cpu or None, args.threads)
        host = "127.0.0.1"
    if args.client_cpu and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in args.client_cpu.split(",")})
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    reference = ort.InferenceSession(str(args.onnx), providers=["CPUExecutionProvider"])
    path = f"/v2/models/{args.model}/infer"
    points: list[Point] = []
    try:
        for batch in batches:
            rows = samples[:batch]
            body = v2_body(args.input_name, rows)
            error = check_first_answer(host, port, path, body, reference.run(None, {args.input_name: rows})[0])
            print(f"batch {batch}: first answer max abs error vs onnxruntime {error:.2e}", file=sys.stderr)
            for concurrency in concurrencies:
                point = asyncio.run(run_point(host, port, path, body, concurrency=concurrency,
                                              requests=args.requests, warmup=args.warmup, label="slimserve",
                                              batch=batch))
                points.append(point)
                print(table([point]).splitlines()[-1], file=sys.stderr)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
            shutil.rmtree(data_dir or "", ignore_errors=True)
    ceiling = inprocess_points(args.onnx, args.input_name, samples, batches, args.threads)
    report = "\n".join([
        f"Model `{args.onnx.name}`, onnxruntime {ort.__version__}, {args.threads} intra-op thread(s), "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"server pinned to CPU {args.server_cpu or '-'}, client to CPU {args.client_cpu or '-'}; "
        f"{args.requests} timed requests per point after {args.warmup} warm-up.",
        "",
        table(points + ceiling),
    ])
    print(report)
    if args.write:
        with open(args.write, "a") as handle:
            handle.write(f"\n### Serving benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n")
            handle.write(report + "\n")


if __name__ == "__main__":
    main()
