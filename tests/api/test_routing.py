"""Routing: default, canary split, shadow traffic; a version in the URL always wins."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.services.catalog import ModelEntry
from app.services.routing import choose
from app.settings import Settings
from tests.conftest import upload
from tests.helpers import MLP, MLP_SAMPLES

ROWS = np.load(MLP_SAMPLES)["input"]


def _two_variants(client: TestClient) -> None:
    """`mlp` with an `int8` variant: a real compressed model with slightly different outputs."""
    assert upload(client, "mlp", MLP, MLP_SAMPLES).status_code == 201
    job = client.post("/models/mlp/compressions", json={"recipe": {"steps": [
        {"op": "quantize", "mode": "dynamic", "per_channel": False}]}, "variant": "int8"}).json()
    deadline = time.monotonic() + 120
    while client.get(f"/jobs/{job['id']}").json()["state"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.2)


@pytest.fixture
def routed(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(catalog_ttl_seconds=0.0))) as client:
        _two_variants(client)
        yield client


def _infer(client: TestClient, row: int, request_id: str | None = None, url: str = "/v2/models/mlp/infer") -> dict:  # type: ignore[type-arg]
    body: dict[str, object] = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                           "data": ROWS[row].tolist()}]}
    if request_id is not None:
        body["id"] = request_id
    response = client.post(url, content=orjson.dumps(body))
    assert response.status_code == 200, response.text
    parsed: dict = response.json()  # type: ignore[type-arg]
    return parsed


def test_canary_split_and_sticky_request_ids(routed: TestClient) -> None:
    routing = routed.put("/models/mlp/routing", json={"default": "original",
                                                      "canary": {"variant": "int8", "percent": 30}})
    assert routing.status_code == 200 and routing.json()["canary"] == {"variant": "int8", "percent": 30.0}
    served = Counter(_infer(routed, i % 100)["model_version"] for i in range(2000))
    assert abs(served["int8"] / 2000 - 0.30) <= 0.05, served
    for request_id in ("alpha", "beta", "gamma", "delta"):
        versions = {_infer(routed, 0, request_id)["model_version"] for _ in range(10)}
        assert len(versions) == 1  # a retry with the same id lands on the same variant
    # A version in the URL, or `variant` in /predict, always wins.
    assert _infer(routed, 0, url="/v2/models/mlp/versions/original/infer")["model_version"] == "original"
    pinned = {routed.post("/models/mlp/predict", json={"inputs": [ROWS[0].tolist()], "variant": "int8"})
              .json()["variant"] for _ in range(20)}
    assert pinned == {"int8"}


def test_default_switch_and_bad_routing(routed: TestClient) -> None:
    assert routed.put("/models/mlp/routing", json={"default": "int8"}).status_code == 200
    assert _infer(routed, 0)["model_version"] == "int8"
    assert routed.get("/models/mlp").json()["routing"]["default"] == "int8"
    bad = [
        ({"default": "ghost"}, "'default' must name a variant"),
        ({"default": "original", "canary": {"variant": "ghost", "percent": 5}}, "does not exist"),
        ({"default": "original", "canary": {"variant": "int8", "percent": 150}}, "0 to 100"),
        ({"default": "original", "shadow": {"variant": "original", "percent": 5}}, "must differ"),
        ({"default": "original", "shadow": {"variant": "int8"}}, "variant"),
    ]
    for body, message in bad:
        response = routed.put("/models/mlp/routing", json=body)
        assert response.status_code == 422 and message in response.json()["error"], (body, response.text)
    assert routed.put("/models/ghost/routing", json={"default": "original"}).status_code == 404
    assert routed.get("/models/mlp").json()["routing"]["default"] == "int8"  # refused changes change nothing


def test_shadow_never_changes_the_answer_and_its_metrics_move(routed: TestClient) -> None:
    expected = [_infer(routed, i)["outputs"][0]["data"] for i in range(50)]
    assert routed.put("/models/mlp/routing", json={"default": "original",
                                                   "shadow": {"variant": "int8", "percent": 100}}).status_code == 200
    for i in range(50):
        answer = _infer(routed, i)
        assert answer["model_version"] == "original" and answer["outputs"][0]["data"] == expected[i]
    deadline = time.monotonic() + 20
    stats: dict = {}  # type: ignore[type-arg]
    while time.monotonic() < deadline:
        stats = routed.get("/models/mlp").json()["shadow"].get("int8", {})
        if stats.get("requests") == 50:
            break
        time.sleep(0.2)
    assert stats["requests"] == 50 and stats["rows"] == 50 and stats["metric"] == "agreement"
    assert stats["agreement"] > 0.9 and stats["cosine_mean"] > 0.99
    assert stats["answer_latency_ms"] > 0 and stats["shadow_latency_ms"] > 0
    metrics = routed.get("/metrics").text
    assert 'slimserve_shadow_agreement_ratio{model="mlp",variant="int8"}' in metrics


def test_choose_respects_percentages() -> None:
    entry = ModelEntry(name="m", state="ready", inputs={}, outputs={}, variants={}, loaded_at=0.0,
                       routing={"default": "a", "canary": {"variant": "b", "percent": 0.0},
                                "shadow": {"variant": "c", "percent": 0.0}})
    assert {choose(entry, None) for _ in range(200)} == {("a", None)}
    entry.routing.update(canary={"variant": "b", "percent": 100.0}, shadow={"variant": "c", "percent": 100.0})
    assert {choose(entry, str(i)) for i in range(200)} == {("b", "c")}
