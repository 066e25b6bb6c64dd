"""Dynamic batching in a real server: concurrent requests share onnxruntime calls and each gets its own rows."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import CNN, TRANSFORMER
from tests.processes import Server

pytestmark = pytest.mark.e2e


def _batch_metric(metrics: str, model: str, suffix: str) -> float:
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == f"slimserve_batch_size_{suffix}" and sample.labels.get("model") == model:
                return sample.value
    return 0.0


def _upload(server: Server, name: str, path: Path) -> None:
    with server.client() as client, open(path, "rb") as handle:
        assert client.post("/models", data={"name": name}, files={"file": (path.name, handle)}).status_code == 201


def test_concurrent_requests_are_batched_and_answered_row_by_row(
    server_factory: Callable[..., Server], tmp_path: Path,
) -> None:
    # Inline execution would finish each tiny call before the next request arrives: no batch could form.
    server = server_factory(tmp_path / "batching", SLIMSERVE_INLINE_INFERENCE_MAX_MS="0")
    _upload(server, "cnn", CNN)
    # A short wait for company: on a loaded machine the client alone may not keep the session busy enough.
    with server.client() as client:
        assert client.put("/models/cnn/batching", json={"enabled": True, "max_batch_size": 64,
                                                        "max_queue_delay_ms": 20}).status_code == 200
    rng = np.random.default_rng(0)
    requests = [rng.random((int(rng.integers(1, 5)), 1, 8, 8), dtype=np.float32) for _ in range(96)]
    reference = ort.InferenceSession(str(CNN))

    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            bodies = [{"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]} for x in requests]
            bodies.insert(40, {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                           "data": [0.0] * 10}]})  # malformed: wrong length
            return list(await asyncio.gather(*(client.post("/v2/models/cnn/infer", json=b) for b in bodies)))

    responses = asyncio.run(send_all())
    bad = responses.pop(40)
    assert bad.status_code == 400
    for x, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        output = response.json()["outputs"][0]
        assert output["shape"] == [len(x), 10]
        np.testing.assert_allclose(np.array(output["data"]).reshape(len(x), 10),
                                   reference.run(None, {"input": x})[0], rtol=1e-4, atol=1e-5)
    metrics = httpx.get(f"{server.url}/metrics").text
    calls, rows = _batch_metric(metrics, "cnn", "count"), _batch_metric(metrics, "cnn", "sum")
    assert rows == sum(len(x) for x in requests)
    assert calls < len(requests)  # several requests shared calls


def test_a_request_failing_inside_a_batch_fails_alone(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    server = server_factory(tmp_path / "batch-errors", SLIMSERVE_INLINE_INFERENCE_MAX_MS="0")
    _upload(server, "encoder", TRANSFORMER)

    def body(token: int) -> dict[str, object]:
        ids = [token] * 16
        return {"inputs": [
            {"name": "input_ids", "shape": [1, 16], "datatype": "INT64", "data": ids},
            {"name": "attention_mask", "shape": [1, 16], "datatype": "INT64", "data": [1] * 16}]}

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            tokens = [5 + i for i in range(40)]
            tokens[17] = 50_000  # outside the embedding table: onnxruntime refuses this one at run time
            return list(await asyncio.gather(*(client.post("/v2/models/encoder/infer", json=body(t))
                                               for t in tokens)))

    responses = asyncio.run(send_all())
    assert responses[17].status_code == 422 and "failed on this input" in responses[17].json()["error"]
    assert all(r.status_code == 200 for i, r in enumerate(responses) if i != 17)
