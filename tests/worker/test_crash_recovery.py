"""Embedded mode: kill -9 the server during a job; after a restart the job resumes at the step it was in and
publishes once."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import CNN, CNN_SAMPLES
from tests.processes import Server
from tests.worker.helpers import wait_for_job, wait_for_state
from tests.worker.test_scale_out import LONG_RECIPE, wait_until

pytestmark = pytest.mark.e2e


def test_server_killed_during_a_job(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    data_dir = tmp_path / "embedded"
    server = server_factory(data_dir)
    with server.client() as api, open(CNN, "rb") as model, open(CNN_SAMPLES, "rb") as samples:
        assert api.post("/models", data={"name": "cnn"},
                        files={"file": ("m.onnx", model), "samples": ("s.npz", samples)}).status_code == 201
        job = api.post("/models/cnn/compressions", json={"recipe": LONG_RECIPE, "variant": "small"}).json()
        wait_for_state(api, job["id"], "running", timeout=60)
        wait_until(lambda: "step 2/2" in (api.get(f"/jobs/{job['id']}").json()["stage"] or ""), timeout=60)
    server.stop(signal.SIGKILL)

    restarted = server_factory(data_dir)
    with restarted.client() as api:
        done = wait_for_job(api, job["id"], timeout=240)
        assert done["state"] == "succeeded", done
        assert done["attempts"] == 2
        assert done["report"]["resumed_from_step"] == 2  # the pruning step was not done again
        assert len(done["report"]["steps"]) == 2
        assert [v["name"] for v in api.get("/models/cnn/variants").json()["variants"]] == ["original", "small"]
    leftovers = [p for p in (data_dir / "tmp").iterdir() if p.suffix != ".lock"]
    assert len(leftovers) == 0
    assert list((data_dir / "artifacts").rglob("*.ckpt")) == []  # the checkpoint went with the job
