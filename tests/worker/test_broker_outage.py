"""Redis down when a job is submitted: the job waits in the database and runs once the broker is back."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import MLP, MLP_SAMPLES
from tests.processes import Server, free_port, kill_group, start_worker
from tests.worker.helpers import wait_for_job

pytestmark = pytest.mark.e2e


def test_jobs_wait_for_the_broker_and_are_not_lost(
    server_factory: Callable[..., Server], postgres_url: str, tmp_path: Path,
) -> None:
    port = free_port()  # nothing listens here yet: the broker is down
    env = {"SLIMSERVE_DATABASE_URL": postgres_url, "SLIMSERVE_QUEUE": "celery",
           "SLIMSERVE_BROKER_URL": f"redis://127.0.0.1:{port}/0", "SLIMSERVE_CELERY_QUEUE": "outage-test",
           "SLIMSERVE_JOB_STALE_SECONDS": "3", "SLIMSERVE_DATA_DIR": str(tmp_path / "shared")}
    server = server_factory(tmp_path / "shared", **env)
    with server.client() as api, open(MLP, "rb") as model, open(MLP_SAMPLES, "rb") as samples:
        assert api.post("/models", data={"name": "mlp"},
                        files={"file": ("m.onnx", model), "samples": ("s.npz", samples)}).status_code == 201
        job = api.post("/models/mlp/compressions", json={"recipe": "int8-dynamic"})
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        time.sleep(2)
        waiting = api.get(f"/jobs/{job_id}").json()
        assert waiting["state"] == "queued" and waiting["stage"] == "waiting for the broker"
        assert api.post("/models/mlp/predict", json={"inputs": [[0.0] * 64]}).status_code == 200

        redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        worker = start_worker(tmp_path / "worker.log", **env)
        try:
            done = wait_for_job(api, job_id, timeout=120)
            assert done["state"] == "succeeded", done
            assert [v["name"] for v in api.get("/models/mlp/variants").json()["variants"]] == ["original",
                                                                                               "int8-dynamic"]
        finally:
            kill_group(worker)
            redis.terminate()
            redis.wait(timeout=10)
