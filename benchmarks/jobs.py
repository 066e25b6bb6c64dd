"""Jobs benchmark: prediction latency while a compression job runs (embedded mode) against idle, and jobs per
minute with 1 and 2 Celery workers (PostgreSQL + Redis on this machine).

Usage (run by hand, not a test; a few minutes):
    .venv/bin/python benchmarks/jobs.py --write docs/jobs.md
"""

# ruff: noqa: T201
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from serving import Point, run_point, table, v2_body  # noqa: E402

CNN = REPO / "models" / "digits_cnn.onnx"
SAMPLES = REPO / "models" / "digits_cnn.samples.npz"
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"
LONG_JOB = {"steps": [{"op": "prune", "mode": "structured", "sparsity": 0.5},
                      {"op": "distill", "epochs": 400, "patience": 100}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as output:
        return subprocess.Popen(command, cwd=REPO, env={**os.environ, **env}, stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not become ready")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def latency_during_job(workdir: Path, requests: int, concurrency: int) -> list[str]:
    port = free_port()
    env = {"SLIMSERVE_DATA_DIR": str(workdir / "embedded"), "SLIMSERVE_PORT": str(port),
           "SLIMSERVE_PRELOAD_MODELS": json.dumps({"digits": {"file": str(CNN), "samples": str(SAMPLES)}})}
    server = start([sys.executable, "-m", "app", "serve"], env, workdir / "embedded.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        body = v2_body("input", np.load(SAMPLES)["input"][:1])
        path = "/v2/models/digits/infer"

        def measure(label: str) -> Point:
            return asyncio.run(run_point("127.0.0.1", port, path, body, concurrency=concurrency,
                                         requests=requests, warmup=200, label=label, batch=1))

        idle = measure("idle")
        job = httpx.post(f"{url}/models/digits/compressions", json={"recipe": LONG_JOB}).json()
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/jobs/{job['id']}").json()["state"] != "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)  # past start-up, into pruning and training
        busy = measure("during a compression job")
        state = httpx.get(f"{url}/jobs/{job['id']}").json()
        httpx.delete(f"{url}/jobs/{job['id']}")
    finally:
        stop(server)
    ratio = busy.pct(99) / idle.pct(99)
    return [
        "## Predictions while a job runs (embedded mode)", "",
        f"digits CNN, batch 1, concurrency {concurrency}, {requests} requests per point; the job is a structured "
        f"prune + distillation in the server's niced child process (job state during the measurement: "
        f"{state['state']}, stage '{state['stage']}').", "",
        table([idle, busy]), "",
        f"p99 during the job / idle p99 = **{ratio:.2f}×** (target ≤ 2×).", "",
    ]


def jobs_per_minute(workdir: Path, workers: int, jobs: int) -> tuple[float, float]:
    database = f"slimserve_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(f"{POSTGRES}/test", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{database}"'))
    port = free_port()
    queue = f"slimserve-bench-{uuid.uuid4().hex[:8]}"
    env = {"SLIMSERVE_DATA_DIR": str(workdir / f"celery-{workers}"), "SLIMSERVE_PORT": str(port),
           "SLIMSERVE_DATABASE_URL": f"{POSTGRES}/{database}", "SLIMSERVE_QUEUE": "celery",
           "SLIMSERVE_BROKER_URL": "redis://127.0.0.1:6379/0", "SLIMSERVE_CELERY_QUEUE": queue}
    processes = [start([sys.executable, "-m", "app", "serve"], env, workdir / "api.log")]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        processes += [start([sys.executable, "-m", "app", "worker"], env, workdir / f"worker-{i}.log")
                      for i in range(workers)]
        with open(CNN, "rb") as model, open(SAMPLES, "rb") as samples:
            httpx.post(f"{url}/models", data={"name": "digits"},
                       files={"file": ("m.onnx", model), "samples": ("s.npz", samples)}, timeout=60)
        time.sleep(5.0)  # let the workers finish importing before the clock starts
        started = time.monotonic()
        ids = [httpx.post(f"{url}/models/digits/compressions",
                          json={"recipe": "int8-static", "variant": f"v{i}"}).json()["id"] for i in range(jobs)]
        while True:
            states = [httpx.get(f"{url}/jobs/{job_id}").json()["state"] for job_id in ids]
            if all(s in ("succeeded", "failed", "cancelled") for s in states):
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        succeeded = states.count("succeeded")
    finally:
        for process in reversed(processes):
            stop(process)
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{database}" WITH (FORCE)'))
        admin.dispose()
    return succeeded / elapsed * 60, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=15000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="slimserve-jobs-bench-"))
    try:
        lines = ["# Jobs benchmark", "",
                 f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/jobs.py` on "
                 f"{os.cpu_count()} CPUs; server, workers and client share the machine, nothing pinned.", ""]
        lines += latency_during_job(workdir, args.requests, args.concurrency)
        lines += ["## Throughput of Celery workers", "",
                  f"{args.jobs} `int8-static` jobs on the digits CNN (calibration, quantization, measurement "
                  "of each variant), PostgreSQL and Redis on this machine, one job per worker at a time.", "",
                  "| workers | wall time s | jobs per minute |", "|---:|---:|---:|"]
        for workers in (1, 2):
            rate, elapsed = jobs_per_minute(workdir, workers, args.jobs)
            lines.append(f"| {workers} | {elapsed:.1f} | {rate:.1f} |")
            print(lines[-1], file=sys.stderr)
        report = "\n".join(lines)
        print(report)
        if args.write:
            args.write.write_text(report + "\n")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
