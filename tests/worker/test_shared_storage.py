"""Artifacts on S3-compatible storage (a local moto server): nodes with separate disks share models and variants."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import s3fs

from tests.helpers import CNN_SAMPLES, MLP, MLP_SAMPLES
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


def _bucket(endpoint: str, bucket: str, postgres_url: str) -> tuple[s3fs.S3FileSystem, dict[str, str]]:
    """A fresh bucket, and the environment of a node storing its artifacts there under `slimserve/`."""
    options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": endpoint,
                                                                  "region_name": "us-east-1"}}
    assert httpx.put(f"{endpoint}/{bucket}").status_code == 200  # create the bucket
    env = {"SLIMSERVE_DATABASE_URL": postgres_url, "SLIMSERVE_STORAGE_URL": f"s3://{bucket}/slimserve",
           "SLIMSERVE_STORAGE_OPTIONS": json.dumps(options)}
    return s3fs.S3FileSystem(**options), env


def test_two_nodes_share_artifacts_through_s3(
    server_factory: Callable[..., Server], postgres_url: str, s3_endpoint: str, tmp_path: Path,
) -> None:
    fs, env = _bucket(s3_endpoint, "models-bucket", postgres_url)
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


def test_folder_models_and_tokenizers_travel_through_s3(
    server_factory: Callable[..., Server], postgres_url: str, s3_endpoint: str, tmp_path: Path,
) -> None:
    """An ONNX model with external data and a converted Hugging Face folder, stored by node A, served by node B."""
    from tests.api.test_archives import _external, _files, _zip
    from tests.e2e.folders import settled as _settled
    from tests.e2e.folders import upload_folder as _upload
    from tests.e2e.test_huggingface import TEXTS
    from tests.exports import hf_folders

    fs, env = _bucket(s3_endpoint, "folders-bucket", postgres_url)
    node_a = server_factory(tmp_path / "node-a", **env)
    node_b = server_factory(tmp_path / "node-b", SLIMSERVE_EMBEDDED_WORKERS="0", **env)
    export = _external(tmp_path / "export")
    bundle = _zip({f"export/{k}": v for k, v in _files(export.parent).items()})
    with node_a.client() as a:
        created = a.post("/models", data={"name": "cnn"}, files={"file": ("cnn.zip", bundle),
                                                                 "samples": ("s.npz", CNN_SAMPLES.read_bytes())})
        assert created.status_code == 201, created.text
        job = a.post("/models/cnn/compressions", json={"recipe": "int8-dynamic"}).json()
        assert wait_for_job(a, job["id"])["state"] == "succeeded"
    assert _upload(node_a.url, "bert", hf_folders() / "bert").status_code == 201
    assert _settled(node_a.url, "bert")["state"] == "ready"
    stored = fs.find("folders-bucket/slimserve", refresh=True)
    assert any(key.endswith(".onnxd/weights.bin") for key in stored)
    assert any(key.endswith(".tok") for key in stored) and any(key.endswith(".hfd/MANIFEST.json") for key in stored)
    assert not [key for key in stored if ".part-" in key]

    with np.load(CNN_SAMPLES) as archive:
        rows = archive["input"][:3].tolist()
    with node_b.client() as b:
        answers = [b.post("/models/cnn/predict", json={"inputs": {"input": rows}, "variant": variant})
                   for variant in ("original", "int8-dynamic")]
        assert [r.status_code for r in answers] == [200, 200], answers[0].text
        download = b.get("/models/cnn/variants/original/artifact")
        with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
            assert sorted(tar.getnames()) == ["cnn-original/model.onnx", "cnn-original/weights.bin"]
        node_a_answer = httpx.post(f"{node_a.url}/v1/embeddings", json={"model": "bert", "input": TEXTS[:2]}).json()
        node_b_answer = b.post("/v1/embeddings", json={"model": "bert", "input": TEXTS[:2]})
        assert node_b_answer.status_code == 200, node_b_answer.text
        assert node_b_answer.json()["data"] == node_a_answer["data"]
        assert list((tmp_path / "node-b" / "artifacts").rglob("*.tok"))  # fetched on first use
        assert b.delete("/models/cnn").status_code == 204
        assert b.delete("/models/bert").status_code == 204
    left = fs.find("folders-bucket/slimserve", refresh=True)
    assert [key for key in left if ".onnxd" in key or ".hfd" in key or key.endswith((".tok", ".onnx"))] == []
