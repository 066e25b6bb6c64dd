"""Beyond SLIMSERVE_MAX_QUEUE waiting requests, the server answers 429 at once and keeps serving."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.helpers import TRANSFORMER
from tests.processes import Server

pytestmark = pytest.mark.e2e


def test_overload_answers_429_with_retry_after(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    server = server_factory(tmp_path / "overload", SLIMSERVE_MAX_QUEUE="2", SLIMSERVE_INLINE_INFERENCE_MAX_MS="0")
    with server.client() as client, open(TRANSFORMER, "rb") as handle:
        assert client.post("/models", data={"name": "encoder"},
                           files={"file": ("t.onnx", handle)}).status_code == 201
        assert client.put("/models/encoder/batching", json={"enabled": False}).status_code == 200
    tokens = 200
    body = {"inputs": [
        {"name": "input_ids", "shape": [1, tokens], "datatype": "INT64", "data": [7] * tokens},
        {"name": "attention_mask", "shape": [1, tokens], "datatype": "INT64", "data": [1] * tokens}]}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=40)) as client:
            return list(await asyncio.gather(*(client.post("/v2/models/encoder/infer", json=body)
                                               for _ in range(40))))

    responses = asyncio.run(burst())
    codes = Counter(r.status_code for r in responses)
    assert set(codes) == {200, 429} and codes[429] > 0, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and "SLIMSERVE_MAX_QUEUE=2" in refused.json()["error"]
    metrics = httpx.get(f"{server.url}/metrics").text
    line = next(row for row in metrics.splitlines()
                if row.startswith("slimserve_requests_total") and 'code="429"' in row)
    assert float(line.rsplit(" ", 1)[1]) == codes[429]
    # Once the burst is over, it serves normally.
    assert httpx.post(f"{server.url}/v2/models/encoder/infer", json=body, timeout=60).status_code == 200


def test_memory_hungry_input_is_refused_and_the_server_goes_on(
    server_factory: Callable[..., Server], tmp_path: Path,
) -> None:
    from tests.helpers import allocating_model

    server = server_factory(tmp_path / "memory", SLIMSERVE_MEMORY_LIMIT_BYTES=str(4 * 2**30))
    with server.client() as client:
        assert client.post("/models", data={"name": "alloc"},
                           files={"file": ("a.onnx", allocating_model())}).status_code == 201
        assert client.post("/models/alloc/predict", json={"inputs": {"n": 100.0}}).json()["outputs"]["s"] == 4950.0
        hungry = client.post("/models/alloc/predict", json={"inputs": {"n": 3e9}})  # 12 GB for one answer
        assert hungry.status_code == 503 and "SLIMSERVE_MEMORY_LIMIT_BYTES" in hungry.json()["error"]
        assert client.post("/models/alloc/predict", json={"inputs": {"n": 10.0}}).json()["outputs"]["s"] == 45.0
    assert server.process.poll() is None
