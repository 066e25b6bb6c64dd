"""Models no one here wrote, through the real server: every preset's job ends with a result or says which step
failed and why, never 'internal error'; what cannot apply is refused at submission (422)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.exports import exporter_models, paddle_models, silero_vad, text_images
from tests.helpers import convolutions_only, npz_bytes
from tests.processes import Server

pytestmark = pytest.mark.e2e


def _upload(url: str, name: str, model: Path, samples: bytes | None = None) -> dict[str, Any]:
    files: dict[str, Any] = {"file": (model.name, model.read_bytes())}
    if samples is not None:
        files["samples"] = ("samples.npz", samples)
    response = httpx.post(f"{url}/models", data={"name": name}, files=files, timeout=60)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def _finished(url: str, job_ids: list[str], timeout: float = 400.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [httpx.get(f"{url}/jobs/{job_id}", timeout=10).json() for job_id in job_ids]
        if all(job["state"] in ("succeeded", "failed", "cancelled") for job in jobs):
            return jobs
        time.sleep(0.5)
    raise AssertionError(f"jobs still running after {timeout} s: {[j['state'] for j in jobs]}")


def test_real_exports_compress_without_internal_errors(server_factory: Callable[..., Server],
                                                       tmp_path: Path) -> None:
    paddle = paddle_models()
    if "cls" not in paddle:
        pytest.skip("rapidocr-onnxruntime (PaddleOCR's models) is not installed")
    url = server_factory(tmp_path / "data").url
    budget = {"metric": "cosine", "max_drop": 0.01}
    _upload(url, "orientation", paddle["cls"], npz_bytes(x=text_images(24, 48, 192)))
    folder = exporter_models()
    _upload(url, "bert", folder / "bert.dynamo.onnx", (folder / "bert.dynamo.samples.npz").read_bytes())
    # Every preset runs on these models in-process (tests/compression/test_exporters.py); through the server, the
    # job path: a calibrated one, the search, and one transformer export.
    submitted = [("orientation", "int8-static"), ("orientation", "int8-dynamic"), ("orientation", "auto"),
                 ("bert", "int8-dynamic")]
    job_ids = []
    for model, preset in submitted:
        response = httpx.post(f"{url}/models/{model}/compressions", json={"recipe": preset, "budget": budget},
                              timeout=30)
        assert response.status_code == 202, (model, preset, response.text)
        job_ids.append(response.json()["id"])

    jobs = _finished(url, job_ids)
    for (model, preset), job in zip(submitted, jobs, strict=True):
        assert "internal error" not in (job["error"] or ""), (model, preset, job["error"])
        assert job["state"] == "succeeded", (model, preset, job["error"])
        for candidate in job["candidates"] or []:
            assert "internal error" not in (candidate.get("error") or ""), candidate
    variant = jobs[1]["variant"]
    feeds = {"x": text_images(2, 48, 192).tolist()}
    answered = httpx.post(f"{url}/models/orientation/predict", json={"inputs": feeds, "variant": variant}, timeout=30)
    assert answered.status_code == 200 and np.asarray(answered.json()["outputs"]["save_infer_model/scale_0.tmp_1"]
                                                      ).shape == (2, 2)


def test_what_cannot_apply_is_refused_at_submission(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    url = server_factory(tmp_path / "data").url
    vad = silero_vad()
    if vad is not None:  # an integer `sr` input: no input can be made up for it
        _upload(url, "vad", vad)
        refused = httpx.post(f"{url}/models/vad/compressions", json={"recipe": "int8-dynamic"}, timeout=30)
        assert refused.status_code == 422 and "upload a dataset" in refused.json()["error"], refused.text
    _upload(url, "convs", convolutions_only(tmp_path / "convs.onnx"))
    refused = httpx.post(f"{url}/models/convs/compressions", json={"recipe": "int4-weight"}, timeout=30)
    assert refused.status_code == 422 and refused.json()["code"] == "recipe_not_applicable"
    assert httpx.get(f"{url}/jobs", timeout=10).json()["jobs"] == []
