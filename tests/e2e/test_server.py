"""A real uvicorn process on a free port, real HTTP, and an independent V2 client (tritonclient, in its own
process: see tests/e2e/triton_client.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import CNN, CNN_SAMPLES, MLP, MLP_SAMPLES, REPO
from tests.processes import Server

pytestmark = pytest.mark.e2e

PRELOAD = json.dumps({"digits": {"file": str(CNN), "samples": str(CNN_SAMPLES)}})


def _upload(server: Server, name: str, path: Path) -> httpx.Response:
    with server.client() as client, open(path, "rb") as handle:
        return client.post("/models", data={"name": name}, files={"file": (path.name, handle)})


def _histogram_count(metrics: str, model: str, protocol: str) -> float:
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if (sample.name == "slimserve_request_duration_seconds_count"
                    and sample.labels == {"model": model, "variant": "original", "protocol": protocol}):
                return sample.value
    return 0.0


def test_upload_then_tritonclient_json_and_binary(server_factory: Callable[..., Server]) -> None:
    server = server_factory(SLIMSERVE_PRELOAD_MODELS=PRELOAD)
    assert _upload(server, "mlp", MLP).status_code == 201
    rows = np.load(MLP_SAMPLES)["input"][:5]
    expected = ort.InferenceSession(str(MLP)).run(None, {"input": rows})[0]

    rows_file, answers_file = server.data_dir.parent / "rows.npy", server.data_dir.parent / "answers.npz"
    np.save(rows_file, rows)
    subprocess.run([sys.executable, "-m", "tests.e2e.triton_client", str(server.port), "mlp", str(rows_file),
                    str(answers_file)], cwd=REPO, check=True, timeout=120)
    with np.load(answers_file) as answers:
        facts = json.loads(str(answers["facts"]))
        assert facts["live"] and facts["ready"] and facts["model_ready"]
        assert facts["metadata"]["inputs"][0]["shape"] == [-1, 64]
        assert facts["ids"] == ["abc"] * 6
        assert sorted(answers.files) == ["binary-0", "binary-1", "binary-2", "default", "facts", "json-0", "json-1",
                                         "json-2"]
        for name in answers.files:
            if name != "facts":
                np.testing.assert_allclose(answers[name], expected, rtol=1e-6)

    # The example model preloaded the way `make run` does it answers at once.
    digits = np.load(CNN_SAMPLES)
    with server.client() as http:
        answer = http.post("/models/digits/predict", json={"inputs": {"input": digits["input"][:20].tolist()}})
        assert answer.status_code == 200
        predicted = np.argmax(np.array(answer.json()["outputs"]["logits"]), axis=1)
        assert (predicted == digits["labels"][:20]).mean() >= 0.9
        metrics = http.get("/metrics").text
    assert _histogram_count(metrics, "mlp", "v2") == 7
    assert _histogram_count(metrics, "digits", "predict") == 1


def test_restart_keeps_models_and_answers(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    data_dir = tmp_path / "persist"
    first = server_factory(data_dir)
    assert _upload(first, "mlp", MLP).status_code == 201
    body = {"inputs": {"input": np.load(MLP_SAMPLES)["input"][:3].tolist()}}
    with first.client() as client:
        before = client.post("/models/mlp/predict", json=body).json()["outputs"]
    first.stop()
    second = server_factory(data_dir)
    with second.client() as client:
        assert client.get("/models/mlp").status_code == 200
        assert client.post("/models/mlp/predict", json=body).json()["outputs"] == before


def _slow_multipart(name: str, payload: bytes, sent: threading.Event) -> Iterator[bytes]:
    boundary = "slimserveboundary"
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n{name}\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"m.onnx\"\r\n"
           "Content-Type: application/octet-stream\r\n\r\n").encode()
    for start in range(0, len(payload), 4096):
        yield payload[start:start + 4096]
        if start > len(payload) // 2:
            sent.set()
            time.sleep(0.2)
    yield f"\r\n--{boundary}--\r\n".encode()


def test_kill_during_upload_leaves_nothing_behind(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    data_dir = tmp_path / "crash"
    server = server_factory(data_dir)
    half_sent = threading.Event()

    def send() -> None:
        try:
            httpx.post(f"{server.url}/models", content=_slow_multipart("mlp", MLP.read_bytes(), half_sent),
                       headers={"Content-Type": "multipart/form-data; boundary=slimserveboundary"}, timeout=30)
        except httpx.HTTPError:
            pass  # the server dies mid-request

    sender = threading.Thread(target=send)
    sender.start()
    assert half_sent.wait(timeout=30)
    deadline = time.monotonic() + 10
    while not list((data_dir / "tmp").glob("*.part")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list((data_dir / "tmp").glob("*.part")), "the upload should be streaming into a temp file"
    server.stop(signal.SIGKILL)
    sender.join(timeout=30)

    restarted = server_factory(data_dir)
    with restarted.client() as client:
        assert client.get("/models").json()["models"] == []
    assert list((data_dir / "tmp").glob("*.part")) == []
    assert [p for p in (data_dir / "artifacts").rglob("*") if p.is_file()] == []


def _mlp_with_int8_variant(server: Server) -> None:
    """Upload the MLP with `compress=int8-dynamic` and wait for the variant."""
    with server.client() as api, open(MLP, "rb") as model, open(MLP_SAMPLES, "rb") as samples:
        assert api.post("/models", data={"name": "mlp", "compress": "int8-dynamic"},
                        files={"file": ("m.onnx", model), "samples": ("s.npz", samples)}).status_code == 201
        job = api.get("/jobs").json()["jobs"][0]
        deadline = time.monotonic() + 120
        while api.get(f"/jobs/{job['id']}").json()["state"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_routing_change_reaches_another_server_process_within_a_second(
    server_factory: Callable[..., Server], tmp_path: Path,
) -> None:
    data_dir = tmp_path / "shared"
    first = server_factory(data_dir)
    second = server_factory(data_dir)
    _mlp_with_int8_variant(first)
    row = {"inputs": [[0.0] * 64]}
    with first.client() as a, second.client() as b:
        assert b.post("/models/mlp/predict", json=row).json()["variant"] == "original"
        assert a.put("/models/mlp/routing", json={"default": "int8-dynamic"}).status_code == 200
        changed = time.monotonic()
        while b.post("/models/mlp/predict", json=row).json()["variant"] != "int8-dynamic":
            assert time.monotonic() - changed < 1.5, "the second process still routes to the old default"
            time.sleep(0.02)


def test_metrics_are_summed_across_server_processes(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    server = server_factory(tmp_path / "multi", args=("--workers", "2"))
    assert _upload(server, "mlp", MLP).status_code == 201
    for _ in range(60):
        # A new connection per request, so the kernel spreads them over both processes.
        assert httpx.post(f"{server.url}/models/mlp/predict", json={"inputs": [[0.0] * 64]}).status_code == 200
    for _ in range(10):
        metrics = httpx.get(f"{server.url}/metrics").text
        assert _histogram_count(metrics, "mlp", "predict") == 60
    # Both processes bind the gRPC port too (SO_REUSEPORT): a new channel per call, every one answered.
    import tritonclient.grpc as triton

    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
    for _ in range(30):
        with triton.InferenceServerClient(server.grpc_target) as client:
            assert client.infer("mlp", [tensor]).as_numpy("logits").shape == (1, 10)
    for _ in range(10):
        assert _histogram_count(httpx.get(f"{server.url}/metrics").text, "mlp", "grpc") == 30


def test_kill_during_routing_changes_leaves_old_or_new_never_a_mix(
    server_factory: Callable[..., Server], tmp_path: Path,
) -> None:
    data_dir = tmp_path / "routing-crash"
    server = server_factory(data_dir)
    _mlp_with_int8_variant(server)
    first = {"default": "original", "canary": {"variant": "int8-dynamic", "percent": 30.0}, "shadow": None}
    second = {"default": "int8-dynamic", "canary": None, "shadow": {"variant": "original", "percent": 50.0}}
    stop = threading.Event()

    def flip() -> None:
        with httpx.Client(base_url=server.url, timeout=5) as client:
            for index in range(10_000):
                if stop.is_set():
                    return
                try:
                    client.put("/models/mlp/routing", json=(first, second)[index % 2])
                except httpx.HTTPError:
                    return  # the server is gone

    flipper = threading.Thread(target=flip)
    flipper.start()
    time.sleep(1.0)
    server.stop(signal.SIGKILL)
    stop.set()
    flipper.join(timeout=30)
    restarted = server_factory(data_dir)
    with restarted.client() as api:
        assert api.get("/models/mlp").json()["routing"] in (first, second)
