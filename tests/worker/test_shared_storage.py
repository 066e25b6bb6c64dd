"""Artifacts on S3-compatible storage (a local moto server): nodes with separate disks share models and variants."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import s3fs

from tests.helpers import MLP, MLP_SAMPLES
from tests.processes import Server, free_port
from tests.worker.helpers import wait_for_job

pytestmark = pytest.mark.e2e


@pytest.fixture
def s3_endpoint(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    with open(tmp_path / "moto.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    process.kill()
    process.wait(timeout=10)


def test_two_nodes_share_artifacts_through_s3(
    server_factory: Callable[..., Server], postgres_url: str, s3_endpoint: str, tmp_path: Path,
) -> None:
    options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": s3_endpoint,
                                                                  "region_name": "us-east-1"}}
    fs = s3fs.S3FileSystem(**options)
    assert httpx.put(f"{s3_endpoint}/models-bucket").status_code == 200  # create the bucket
    env = {"SLIMSERVE_DATABASE_URL": postgres_url, "SLIMSERVE_STORAGE_URL": "s3://models-bucket/slimserve",
           "SLIMSERVE_STORAGE_OPTIONS": json.dumps(options)}
    node_a = server_factory(tmp_path / "node-a", **env)
    # Node B runs no jobs (both schedulers see the shared database), so its disk only ever gets what it serves.
    node_b = server_factory(tmp_path / "node-b", SLIMSERVE_EMBEDDED_WORKERS="0", **env)
    with node_a.client() as a, open(MLP, "rb") as model, open(MLP_SAMPLES, "rb") as samples:
        created = a.post("/models", data={"name": "mlp"},
                         files={"file": ("m.onnx", model), "samples": ("s.npz", samples)})
        assert created.status_code == 201, created.text
        sha = created.json()["sha256"]
        job = a.post("/models/mlp/compressions", json={"recipe": "int8-dynamic", "variant": "small"}).json()
        assert wait_for_job(a, job["id"])["state"] == "succeeded"
    stored = fs.find("models-bucket/slimserve")
    assert f"models-bucket/slimserve/{sha[:2]}/{sha}.onnx" in stored
    assert not [key for key in stored if ".part-" in key]
    # Node B has never seen these files on its own disk: it fetches them from S3 on first use.
    assert not list((tmp_path / "node-b" / "artifacts").rglob("*.onnx"))
    row = {"inputs": [[0.0] * 64]}
    with node_b.client() as b:
        assert b.post("/models/mlp/predict", json=row).status_code == 200
        assert b.post("/models/mlp/predict", json={**row, "variant": "small"}).json()["variant"] == "small"
        artifact = b.get("/models/mlp/variants/original/artifact")
        assert artifact.content == MLP.read_bytes()
        assert (tmp_path / "node-b" / "artifacts" / sha[:2] / f"{sha}.onnx").is_file()
        assert b.delete("/models/mlp").status_code == 204
    assert [key for key in fs.find("models-bucket/slimserve", refresh=True) if key.endswith(".onnx")] == []
    httpx.get(f"{s3_endpoint}/moto-api/reset")
