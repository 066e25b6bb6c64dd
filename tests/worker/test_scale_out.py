"""Scaled out for real: PostgreSQL, Redis, Celery workers and API servers as separate processes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import CNN, CNN_SAMPLES, MLP, MLP_SAMPLES
from tests.processes import Server, kill_group, start_worker
from tests.worker.helpers import wait_for_job, wait_for_state

pytestmark = pytest.mark.e2e

# Long enough to be killed mid-way, short enough for CI: distillation epochs on the digits CNN.
LONG_RECIPE = {"steps": [{"op": "prune", "mode": "structured", "sparsity": 0.5},
                         {"op": "distill", "epochs": 40, "patience": 40}]}


@pytest.fixture
def scaled_env(postgres_url: str, broker: tuple[str, str], tmp_path: Path) -> dict[str, str]:
    url, queue = broker
    return {
        "SLIMSERVE_DATABASE_URL": postgres_url, "SLIMSERVE_QUEUE": "celery", "SLIMSERVE_BROKER_URL": url,
        "SLIMSERVE_CELERY_QUEUE": queue, "SLIMSERVE_DATA_DIR": str(tmp_path / "shared"),
        "SLIMSERVE_JOB_STALE_SECONDS": "4", "SLIMSERVE_JOB_HEARTBEAT_SECONDS": "0.5",
        "SLIMSERVE_CELERY_VISIBILITY_TIMEOUT": "30",
    }


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(env: dict[str, str]) -> subprocess.Popen[bytes]:
        process = start_worker(tmp_path / f"worker-{len(started)}.log", **env)
        started.append(process)
        return process

    yield start
    for process in started:
        kill_group(process)


def _upload(server: Server, name: str, model: Path, samples: Path) -> None:
    with server.client() as client, open(model, "rb") as m, open(samples, "rb") as s:
        response = client.post("/models", data={"name": name}, files={"file": (model.name, m), "samples": (s.name, s)})
        assert response.status_code == 201, response.text


def test_celery_worker_runs_jobs_and_a_second_api_sees_them(
    server_factory: Callable[..., Server], workers: Callable[..., subprocess.Popen[bytes]], scaled_env: dict[str, str],
    tmp_path: Path,
) -> None:
    first = server_factory(tmp_path / "shared", **scaled_env)
    second = server_factory(tmp_path / "shared", **scaled_env)
    workers(scaled_env)
    _upload(first, "mlp", MLP, MLP_SAMPLES)
    with first.client() as api:
        job = api.post("/models/mlp/compressions", json={"recipe": "int8-dynamic"}).json()
        done = wait_for_job(api, job["id"])
        assert done["state"] == "succeeded", done
    with second.client() as other:
        # The other API process reads the same PostgreSQL and artifact store.
        variants = [v["name"] for v in other.get("/models/mlp/variants").json()["variants"]]
        assert variants == ["original", "int8-dynamic"]
        answer = other.post("/models/mlp/predict", json={"inputs": [[0.0] * 64], "variant": "int8-dynamic"})
        assert answer.status_code == 200
        assert other.get(f"/jobs/{job['id']}").json()["state"] == "succeeded"


def test_worker_killed_mid_job_is_replaced_and_the_job_completes_once(
    server_factory: Callable[..., Server], workers: Callable[..., subprocess.Popen[bytes]], scaled_env: dict[str, str],
    tmp_path: Path,
) -> None:
    api_server = server_factory(tmp_path / "shared", **scaled_env)
    victim = workers(scaled_env)
    _upload(api_server, "cnn", CNN, CNN_SAMPLES)
    with api_server.client() as api:
        job = api.post("/models/cnn/compressions", json={"recipe": LONG_RECIPE, "variant": "small"}).json()
        running = wait_for_state(api, job["id"], "running", timeout=60)
        wait_until(lambda: "step 2/2" in (api.get(f"/jobs/{job['id']}").json()["stage"] or ""), timeout=60)
        kill_group(victim, signal.SIGKILL)
        workers(scaled_env)
        done = wait_for_job(api, job["id"], timeout=240)
        assert done["state"] == "succeeded", done
        assert done["attempts"] == 2 and running["attempts"] == 1
        assert done["report"]["resumed_from_step"] == 2
        variants = [v["name"] for v in api.get("/models/cnn/variants").json()["variants"]]
        assert variants == ["original", "small"]


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_celery_worker_converts_a_pytorch_upload_then_runs_the_compression_it_asked_for(
    server_factory: Callable[..., Server], workers: Callable[..., subprocess.Popen[bytes]], scaled_env: dict[str, str],
    tmp_path: Path, torch_model_files: dict[str, Path],
) -> None:
    from tests import torch_files

    files = torch_model_files
    api_server = server_factory(tmp_path / "shared", **scaled_env)
    workers(scaled_env)
    with api_server.client() as api, open(files["cnn.pt"], "rb") as model:
        response = api.post("/models", files={"file": ("cnn.pt", model)}, data={
            "name": "cnn", "input_shapes": json.dumps(torch_files.CNN_INPUT), "compress": "int8-dynamic"})
        assert response.status_code == 201 and response.json()["state"] == "converting", response.text
        conversion = next(j for j in api.get("/jobs").json()["jobs"] if j["recipe"] == "convert")
        assert wait_for_job(api, conversion["id"])["state"] == "succeeded"
        # The worker itself published the compression job to the broker once the ONNX existed.
        wait_until(lambda: any(j["recipe"] == "int8-dynamic" for j in api.get("/jobs").json()["jobs"]), timeout=30)
        compression = next(j for j in api.get("/jobs").json()["jobs"] if j["recipe"] == "int8-dynamic")
        assert wait_for_job(api, compression["id"])["state"] == "succeeded"
        model_state = api.get("/models/cnn").json()
        assert model_state["state"] == "ready" and model_state["conversion"]["max_abs_error"] < 1e-4
        assert [v["name"] for v in model_state["variants"]] == ["original", "int8-dynamic"]
