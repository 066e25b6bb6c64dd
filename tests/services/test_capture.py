from __future__ import annotations

import random
import time

import numpy as np
from fastapi.testclient import TestClient

from app.main import create_app
from app.services.capture import _merge
from tests.conftest import upload
from tests.helpers import MLP
from tests.worker.helpers import wait_for_job


def test_merge_keeps_the_streams_in_proportion() -> None:
    a = {"x": np.zeros((100, 2))}
    b = {"x": np.ones((100, 2))}
    merged = _merge(a, 900, b, 100, 100, random.Random(0))
    assert merged["x"].shape == (100, 2)
    assert int(merged["x"][:, 0].sum()) == 10  # b saw 10% of the rows


def test_captured_traffic_becomes_a_dataset_for_compression(make_settings) -> None:  # type: ignore[no-untyped-def]
    with TestClient(create_app(make_settings(capture_flush_seconds=0.2))) as client:
        assert upload(client, "mlp", MLP).status_code == 201
        assert client.put("/models/mlp/capture", json={"samples": 50}).json() == {"samples": 50, "enabled": True}
        assert client.put("/models/mlp/capture", json={"samples": 0}).status_code == 422
        for i in range(120):
            row = [i / 1000] * 64
            body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}]}
            assert client.post("/v2/models/mlp/infer", json=body).status_code == 200
        deadline = time.monotonic() + 20
        model = client.get("/models/mlp").json()
        while time.monotonic() < deadline and (model["capture"] or {}).get("seen") != 120:
            time.sleep(0.1)
            model = client.get("/models/mlp").json()
        assert model["capture"] == {"samples": 50, "seen": 120}
        traffic = next(d for d in model["datasets"] if d["name"] == "traffic")
        assert traffic["samples"] == 50 and traffic["has_labels"] is False
        job = client.post("/models/mlp/compressions", json={"recipe": "int8-static", "dataset": "traffic"}).json()
        done = wait_for_job(client, job["id"])
        assert done["state"] == "succeeded", done
        assert done["report"]["fidelity"]["data"] == "dataset"
        assert client.delete("/models/mlp/capture").json()["enabled"] is False
