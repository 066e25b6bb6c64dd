"""gRPC benchmark: SlimServe's Open Inference Protocol over gRPC beside MLServer's and KServe's gRPC, and beside
SlimServe's own REST (binary tensors), on the peers' MLP, with one client for all.

Usage (by hand, not a test; a few minutes on 2 cores; the peers' virtualenvs from ../shared/peers/setup_venvs.sh):
    PEERS_VENVS=/path/to/peers-venvs .venv/bin/python benchmarks/grpc.py --write docs/performance.md

Same machine, one run: every server pinned to CPU 0 with onnxruntime on 1 thread, the client pinned to CPU 1.
The client is one asyncio process: for gRPC one grpc.aio channel (HTTP/2, calls multiplexed) with C concurrent
callers sending the same pre-serialized ModelInferRequest (raw_input_contents) and receiving bytes, so its cost
is the same whatever server answers; for REST C keep-alive HTTP/1.1 connections on asyncio streams sending the
binary tensor extension (benchmarks/serving.py's client). Every target's first answer is checked against
onnxruntime.
"""

# ruff: noqa: T201
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# This file is benchmarks/grpc.py: run as a script, its folder comes first on sys.path and `import grpc` would
# import the script itself.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import grpc  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import orjson  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.api.grpc_service import inference_pb2 as pb  # noqa: E402
from benchmarks.docs_section import write_section  # noqa: E402
from benchmarks.serving import Connection, Point, build_request, free_port, run_point  # noqa: E402

PEERS = REPO.parent / "shared" / "peers"
MODEL = PEERS / "model" / "mlp.onnx"
SERVER_CPU, CLIENT_CPU = "0", 1
MATRIX = [(1, 1), (1, 16), (32, 1), (32, 16)]
INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass
class Target:
    label: str
    process: subprocess.Popen[bytes]
    grpc_port: int | None
    http_port: int | None
    model: str
    version: str = ""


def _wait_port(port: int, process: subprocess.Popen[bytes], seconds: float = 90) -> None:
    import socket

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"nothing listens on {port} after {seconds} s")


def _pinned(command: list[str]) -> list[str]:
    return ["taskset", "-c", SERVER_CPU, *command] if shutil.which("taskset") else command


def start_slimserve(work: Path) -> Target:
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "SLIMSERVE_DATA_DIR": str(work / "slimserve"), "SLIMSERVE_PORT": str(http_port),
           "SLIMSERVE_GRPC_PORT": str(grpc_port), "SLIMSERVE_INTRA_OP_THREADS": "1", "SLIMSERVE_LOG_LEVEL": "warning"}
    process = subprocess.Popen(_pinned([sys.executable, "-m", "app", "serve"]), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    _wait_port(http_port, process)
    with open(MODEL, "rb") as handle:
        httpx.post(f"http://127.0.0.1:{http_port}/models", data={"name": "mlp"},
                   files={"file": ("mlp.onnx", handle)}, timeout=60).raise_for_status()
    _wait_port(grpc_port, process)
    return Target("SlimServe", process, grpc_port, http_port, "mlp")


def start_mlserver(venvs: Path, work: Path) -> Target:
    folder = work / "mlserver"
    shutil.copytree(PEERS / "mlserver_model", folder)
    shutil.copytree(PEERS / "model", work / "model", dirs_exist_ok=True)
    env = {**os.environ, "ORT_THREADS": "1"}
    process = subprocess.Popen(_pinned([str(venvs / "mlserver" / "bin" / "mlserver"), "start", "."]), cwd=folder,
                               env=env, stdout=open(work / "mlserver.log", "wb"), stderr=subprocess.STDOUT)
    _wait_port(8012, process)
    _wait_port(8002, process)
    time.sleep(2.0)  # the model loads after the ports open
    return Target("MLServer 1.7.1", process, 8012, None, "mlp")


def start_kserve(venvs: Path, work: Path) -> Target:
    port, grpc_port = free_port(), free_port()
    launcher = REPO / "benchmarks" / "peers" / "kserve_grpc_server.py"
    env = {**os.environ, "ORT_THREADS": "1"}
    process = subprocess.Popen(
        _pinned([str(venvs / "kserve" / "bin" / "python"), str(launcher), "--model", str(MODEL), "--port", str(port),
                 "--grpc-port", str(grpc_port)]),
        env=env, stdout=open(work / "kserve.log", "wb"), stderr=subprocess.STDOUT)
    _wait_port(grpc_port, process)
    _wait_port(port, process)
    return Target("KServe 0.21.0", process, grpc_port, None, "mlp")


def start_echo(work: Path, session: ort.InferenceSession, rows: np.ndarray) -> Target:
    """grpcio's own ceiling on this core: an answer returned without reading the request (right for batch 32
    only; the benchmark checks numbers at that batch)."""
    answer = pb.ModelInferResponse(model_name="mlp", model_version="1")
    output = session.run(None, {"input": rows})[0]
    answer.outputs.add(name="output", datatype="FP32", shape=output.shape)
    answer.raw_output_contents.append(output.tobytes())
    (work / "answer.bin").write_bytes(answer.SerializeToString())
    port = free_port()
    process = subprocess.Popen(
        _pinned([sys.executable, str(REPO / "benchmarks" / "peers" / "grpc_echo_server.py"), "--port", str(port),
                 "--answer", str(work / "answer.bin")]), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    _wait_port(port, process)
    return Target("grpc.aio echo (no model, no parsing)", process, port, None, "mlp")


def grpc_request(target: Target, rows: np.ndarray) -> bytes:
    request = pb.ModelInferRequest(model_name=target.model, model_version=target.version)
    request.inputs.add(name="input", datatype="FP32", shape=rows.shape)
    request.raw_input_contents.append(rows.tobytes())
    return request.SerializeToString()


def _decoded(answer: bytes) -> np.ndarray:
    response = pb.ModelInferResponse.FromString(answer)
    output = response.outputs[0]
    if response.raw_output_contents:
        return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(tuple(output.shape))
    return np.array(output.contents.fp32_contents, np.float32).reshape(tuple(output.shape))


async def grpc_point(target: Target, rows: np.ndarray, concurrency: int, requests: int, warmup: int,
                     expected: np.ndarray) -> Point:
    body = grpc_request(target, rows)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{target.grpc_port}") as channel:
        call: Callable[..., grpc.aio.UnaryUnaryCall] = channel.unary_unary(INFER)  # bytes in, bytes out
        first = await call(body, timeout=30)
        if "echo" not in target.label or rows.shape[0] == 32:
            np.testing.assert_allclose(_decoded(first), expected, rtol=1e-4, atol=1e-4)
        latencies: list[float] = []
        errors = 0

        async def caller(count: int, record: bool) -> None:
            nonlocal errors
            for _ in range(count):
                started = time.perf_counter()
                try:
                    await call(body, timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                if record:
                    latencies.append((time.perf_counter() - started) * 1e3)

        await asyncio.gather(*(caller(max(warmup // concurrency, 1), False) for _ in range(concurrency)))
        per = requests // concurrency
        started = time.perf_counter()
        await asyncio.gather(*(caller(per, True) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return Point(f"{target.label} gRPC", rows.shape[0], concurrency, per * concurrency, seconds, latencies, errors)


async def rest_point(target: Target, rows: np.ndarray, concurrency: int, requests: int, warmup: int,
                     expected: np.ndarray) -> Point:
    """The same request as V2 REST with binary tensors in and out (what tritonclient.http sends)."""
    assert target.http_port is not None
    header = orjson.dumps({"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": rows.nbytes}}],
                           "parameters": {"binary_data_output": True}})
    path, body = f"/v2/models/{target.model}/infer", header + rows.tobytes()
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    connection = await Connection.open("127.0.0.1", target.http_port)
    status, answer = await connection.post(build_request("127.0.0.1", target.http_port, path, body, headers))
    connection.close()
    assert status == 200, answer[:300]
    np.testing.assert_allclose(np.frombuffer(answer[-expected.nbytes:], np.float32).reshape(expected.shape),
                               expected, rtol=1e-4, atol=1e-4)
    return await run_point("127.0.0.1", target.http_port, path, body, concurrency=concurrency, requests=requests,
                           warmup=warmup, label=f"{target.label} REST (binary)", batch=rows.shape[0], headers=headers)


def stop(target: Target) -> None:
    if target.process.poll() is None:
        target.process.send_signal(signal.SIGINT)
        try:
            target.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            target.process.kill()
            target.process.wait()
    time.sleep(1.0)  # the port is free again before the next server starts


def measure(targets: Callable[[], Target], rows_all: np.ndarray, session: ort.InferenceSession, requests: int,
            warmup: int, rest: bool) -> list[Point]:
    target = targets()
    points = []
    try:
        for batch, concurrency in MATRIX:
            rows = rows_all[:batch]
            expected = session.run(None, {"input": rows})[0]
            points.append(asyncio.run(grpc_point(target, rows, concurrency, requests, warmup, expected)))
            print(_line(points[-1]), file=sys.stderr)
            if rest:
                points.append(asyncio.run(rest_point(target, rows, concurrency, requests, warmup, expected)))
                print(_line(points[-1]), file=sys.stderr)
    finally:
        stop(target)
    return points


def _line(point: Point) -> str:
    return (f"| {point.target} | {point.batch} | {point.concurrency} | {point.rps:.0f} | "
            f"{point.rps * point.batch:.0f} | {point.pct(50):.2f} | {point.pct(99):.2f} | {point.errors} |")


def report(points: list[Point]) -> list[str]:
    def find(label: str, batch: int, concurrency: int) -> Point | None:
        return next((p for p in points if p.target == label and p.batch == batch and p.concurrency == concurrency),
                    None)

    ours = "SlimServe gRPC"
    ceiling = "grpc.aio echo (no model, no parsing) gRPC"
    peers = sorted({p.target for p in points if p.target.endswith("gRPC") and p.target not in (ours, ceiling)})
    lines = [
        "## gRPC, side by side with the peers' gRPC", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/grpc.py`: onnxruntime "
        f"{ort.__version__}, grpcio {grpc.__version__}, Python {platform.python_version()}, {os.cpu_count()} cores. "
        "The peers' MLP (`shared/peers/model/mlp.onnx`, 64→256→256→10); every server pinned to CPU 0, onnxruntime "
        "1 thread; one asyncio client pinned to CPU 1 for every target (one grpc.aio channel, the same "
        "pre-serialized request with raw_input_contents; REST: keep-alive connections with binary tensors). "
        "Request counts after a warm-up; every first answer checked against onnxruntime.", "",
        "| target | batch | concurrency | req/s | rows/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|", *(_line(p) for p in points), "", "### Targets", ""]
    checks = [(1, 16, "req/s"), (32, 16, "rows/s")]
    for batch, concurrency, unit in checks:
        mine = find(ours, batch, concurrency)
        rivals = [p for p in (find(name, batch, concurrency) for name in peers) if p is not None]
        if mine is None or not rivals:
            continue
        best = max(rivals, key=lambda p: p.rps)
        ratio = mine.rps / best.rps
        lines.append(f"- batch {batch}, concurrency {concurrency}: {ratio:.2f}× the best peer's gRPC {unit} "
                     f"({best.target}) — target ≥ 2×: {'met' if ratio >= 2 else 'missed'}.")
        if batch == 1:
            worst = min(p.pct(99) for p in rivals)
            lines.append(f"- batch 1, concurrency 16 p99: {mine.pct(99):.2f} ms against the best peer's "
                         f"{worst:.2f} ms — target below every peer: {'met' if mine.pct(99) < worst else 'missed'}.")
    for batch, concurrency in MATRIX:
        mine, rest = find(ours, batch, concurrency), find("SlimServe REST (binary)", batch, concurrency)
        if mine is not None and rest is not None:
            ratio = mine.rps / rest.rps
            lines.append(f"- SlimServe gRPC / REST at batch {batch}, concurrency {concurrency}: {ratio:.2f}× — "
                         f"target ≥ 0.8×: {'met' if ratio >= 0.8 else 'missed'}.")
    for batch, concurrency in MATRIX:
        mine, echo = find(ours, batch, concurrency), find(ceiling, batch, concurrency)
        if mine is not None and echo is not None:
            lines.append(f"- batch {batch}, concurrency {concurrency}: SlimServe gRPC reaches "
                         f"{mine.rps / echo.rps:.2f}× grpcio's own ceiling on this core (an answer returned without "
                         "reading the request).")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--only", nargs="*", help="slimserve, mlserver, kserve, echo")
    args = parser.parse_args()
    venvs = Path(os.environ.get("PEERS_VENVS", ""))
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {CLIENT_CPU})
    rows = np.asarray(np.load(PEERS / "model" / "mlp.onnx.sample.npz")["x"], np.float32)
    rows = np.concatenate([rows] * (1 + 32 // len(rows)))[:32]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])
    points: list[Point] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        starts: dict[str, Callable[[], Target]] = {
            "slimserve": lambda: start_slimserve(work),
            "mlserver": lambda: start_mlserver(venvs, work),
            "kserve": lambda: start_kserve(venvs, work),
            "echo": lambda: start_echo(work, session, rows),
        }
        for key, start in starts.items():
            if args.only and key not in args.only:
                continue
            points += measure(start, rows, session, args.requests, args.warmup, rest=key == "slimserve")
    text = "\n".join(report(points))
    print(text)
    if args.write:
        write_section(args.write, "grpc", text)


if __name__ == "__main__":
    main()
