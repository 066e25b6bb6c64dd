"""Bounded load test (loopback only, stops by itself): requests at concurrency 64 across two variants while a
compression job runs. Zero 5xx, every answer checked, server memory flat. `make test` runs a short version;
`make soak` runs the full 20,000 requests (SOAK_REQUESTS)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests.helpers import CNN, CNN_SAMPLES
from tests.processes import Server
from tests.worker.helpers import wait_for_job, wait_for_state

pytestmark = pytest.mark.e2e

REQUESTS = int(os.environ.get("SOAK_REQUESTS", "2000"))
CONCURRENCY = 64


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_soak_two_variants_during_a_job(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    server = server_factory(tmp_path / "soak")
    samples = np.load(CNN_SAMPLES)["input"]
    with server.client() as client, open(CNN, "rb") as model, open(CNN_SAMPLES, "rb") as data:
        assert client.post("/models", data={"name": "cnn"},
                           files={"file": ("m.onnx", model), "samples": ("s.npz", data)}).status_code == 201
        first = client.post("/models/cnn/compressions", json={"recipe": "int8-static", "variant": "int8"}).json()
        assert wait_for_job(client, first["id"])["state"] == "succeeded"
        variant_file = tmp_path / "int8.onnx"
        variant_file.write_bytes(client.get("/models/cnn/variants/int8/artifact").content)
        # Long jobs queued one behind the other keep a compression running for the whole load.
        busy = [client.post("/models/cnn/compressions", json={"recipe": {"steps": [
            {"op": "prune", "mode": "structured", "sparsity": 0.5},
            {"op": "distill", "epochs": 1000, "patience": 100}]}}).json()["id"] for _ in range(6)]
        wait_for_state(client, busy[0], "running")
    references = {"original": ort.InferenceSession(str(CNN)).run(None, {"input": samples})[0],
                  "int8": ort.InferenceSession(str(variant_file)).run(None, {"input": samples})[0]}
    rss: list[int] = []
    running: list[int] = []
    problems: list[str] = []

    async def run() -> None:
        sent = 0
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=CONCURRENCY)) as client:

            async def worker() -> None:
                nonlocal sent
                while sent < REQUESTS:
                    index, sent = sent, sent + 1
                    row, variant = index % len(samples), ("original", "int8")[index % 2]
                    body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                        "data": samples[row].ravel().tolist()}]}
                    response = await client.post(f"/v2/models/cnn/versions/{variant}/infer", json=body)
                    if response.status_code != 200:
                        problems.append(f"{variant} row {row}: {response.status_code} {response.text[:100]}")
                        continue
                    got = np.array(response.json()["outputs"][0]["data"], dtype=np.float32)
                    if not np.allclose(got, references[variant][row], rtol=1e-4, atol=1e-4):
                        problems.append(f"{variant} row {row}: wrong answer")
                    if index % (REQUESTS // 8) == 0:
                        rss.append(_rss(server.process.pid))
                        jobs = (await client.get("/jobs", params={"state": "running"})).json()["jobs"]
                        running.append(len(jobs))

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))

    started = time.monotonic()
    asyncio.run(run())
    elapsed = time.monotonic() - started
    with server.client() as client:
        for job_id in busy:
            client.delete(f"/jobs/{job_id}")
    assert problems == [], problems[:10]
    assert running and min(running) >= 1, f"a compression job should run during the whole load: {running}"
    quarter = len(rss) // 4
    second, last = rss[quarter:2 * quarter], rss[3 * quarter:]
    assert max(last) < 1.10 * max(second), (rss, elapsed)
