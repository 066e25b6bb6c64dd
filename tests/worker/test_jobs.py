"""Jobs through the API with the embedded queue: a real child process runs each job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from tests.conftest import upload
from tests.helpers import CNN, CNN_SAMPLES, MLP, MLP_SAMPLES, convolutions_only, npz_bytes
from tests.worker.helpers import wait_for_job, wait_for_state

ROW = {"inputs": [[0.0] * 64]}


def test_compression_job_publishes_a_measured_variant(mlp_client: TestClient) -> None:
    response = mlp_client.post("/models/mlp/compressions", json={"recipe": "int8-dynamic"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] in ("queued", "running") and job["variant"] == "int8-dynamic" and job["model"] == "mlp"
    # The original answers while the job runs.
    assert mlp_client.post("/models/mlp/predict", json=ROW).status_code == 200
    done = wait_for_job(mlp_client, job["id"])
    assert done["state"] == "succeeded", done
    assert done["progress"] == 1.0 and done["attempts"] == 1 and done["finished_at"] is not None
    variants = {v["name"]: v for v in mlp_client.get("/models/mlp/variants").json()["variants"]}
    report = variants["int8-dynamic"]["report"]
    assert report["size_ratio"] < 0.5 and report["fidelity"]["samples"] > 0
    assert report["fidelity"]["data"] == "dataset" and report["fidelity"]["accuracy"] is not None
    assert variants["int8-dynamic"]["parent"] == "original"
    answer = mlp_client.post("/models/mlp/predict", json={**ROW, "variant": "int8-dynamic"})
    assert answer.status_code == 200 and answer.json()["variant"] == "int8-dynamic"
    v2 = mlp_client.post("/v2/models/mlp/versions/int8-dynamic/infer", json={"inputs": [
        {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]})
    assert v2.status_code == 200 and v2.headers["x-variant"] == "int8-dynamic"
    artifact = mlp_client.get("/models/mlp/variants/int8-dynamic/artifact")
    assert artifact.status_code == 200 and len(artifact.content) == variants["int8-dynamic"]["size_bytes"]
    # Routing is unchanged without promote.
    assert mlp_client.get("/models/mlp").json()["routing"]["default"] == "original"
    metrics = mlp_client.get("/metrics").text
    assert 'slimserve_compression_jobs_total{state="succeeded"} 1.0' in metrics
    assert 'slimserve_compression_job_duration_seconds_count{recipe="int8-dynamic"} 1.0' in metrics
    listed = mlp_client.get("/jobs", params={"model": "mlp"}).json()["jobs"]
    assert [j["id"] for j in listed] == [job["id"]]


def test_promote_within_budget_makes_the_variant_the_default(mlp_client: TestClient) -> None:
    job = mlp_client.post("/models/mlp/compressions", json={
        "recipe": "fp16", "variant": "half", "promote": True, "budget": {"metric": "agreement", "max_drop": 0.05}})
    assert wait_for_job(mlp_client, job.json()["id"])["state"] == "succeeded"
    assert mlp_client.get("/models/mlp").json()["routing"]["default"] == "half"
    assert mlp_client.post("/models/mlp/predict", json=ROW).json()["variant"] == "half"
    assert mlp_client.delete("/models/mlp/variants/half").status_code == 409  # receives traffic


def test_promote_with_a_missed_budget_fails_and_changes_nothing(mlp_client: TestClient) -> None:
    job = mlp_client.post("/models/mlp/compressions", json={
        "recipe": {"steps": [{"op": "prune", "mode": "unstructured", "sparsity": 0.95}]}, "promote": True,
        "budget": {"metric": "accuracy", "max_drop": 0.0}}).json()
    done = wait_for_job(mlp_client, job["id"])
    assert done["state"] == "failed" and "misses the budget" in done["error"]
    assert done["report"]["within_budget"] is False
    model = mlp_client.get("/models/mlp").json()
    assert [v["name"] for v in model["variants"]] == ["original"] and model["routing"]["default"] == "original"


def test_upload_with_compress_starts_a_job(client: TestClient) -> None:
    response = client.post("/models", data={"name": "mlp", "compress": "int8-dynamic"},
                           files={"file": ("m.onnx", MLP.read_bytes()), "samples": ("s.npz", MLP_SAMPLES.read_bytes())})
    assert response.status_code == 201, response.text
    assert client.post("/models/mlp/predict", json=ROW).status_code == 200  # the original answers at once
    job = client.get("/jobs", params={"model": "mlp"}).json()["jobs"][0]
    assert wait_for_job(client, job["id"])["state"] == "succeeded"
    assert client.post("/models/mlp/predict", json={**ROW, "variant": "int8-dynamic"}).status_code == 200


def test_upload_with_a_bad_recipe_stores_nothing(client: TestClient) -> None:
    response = client.post("/models", data={"name": "mlp", "compress": "int3"},
                           files={"file": ("m.onnx", MLP.read_bytes())})
    assert response.status_code == 422 and "unknown preset 'int3'" in response.json()["error"]
    assert client.get("/models/mlp").status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"recipe": "int3"}, 422, "unknown preset"),
        ({"recipe": {"steps": [{"op": "shrink"}]}}, 422, "unknown op 'shrink'"),
        ({"recipe": {"steps": [{"op": "prune", "mode": "structured", "sparsity": 1.5}]}}, 422, "sparsity"),
        ({"recipe": {"steps": [{"op": "quantize", "mode": "static", "per_channel": "yes"}]}}, 422, "per_channel"),
        ({"recipe": "int8-static", "dataset": "nope"}, 422, "no dataset 'nope'"),
        ({"recipe": "int8-static", "budget": {"metric": "speed"}}, 422, "budget"),
        ({"recipe": "int8-static", "objective": "size"}, 422, "'auto' recipe only"),
        ({"recipe": "int8-static", "variant": "../x"}, 422, "invalid variant name"),
        ({"recipe": "int8-static", "variant": "original"}, 409, "already has"),
        ({"recipe": 7}, 422, "recipe"),
        ({"recipe": "int8-static", "colour": "red"}, 422, "colour"),
        ({"recipe": {"steps": [{"op": "distill", "student": "ghost"}]}}, 422, "'ghost' is not an uploaded model"),
    ],
)
def test_bad_compression_requests(mlp_client: TestClient, body: dict, status: int, message: str) -> None:  # type: ignore[type-arg]
    response = mlp_client.post("/models/mlp/compressions", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert mlp_client.get("/jobs").json()["jobs"] == []


def test_data_requirements_are_checked_before_queueing(client: TestClient) -> None:
    assert upload(client, "bare", MLP).status_code == 201  # no samples, no dataset
    distill = client.post("/models/bare/compressions", json={"recipe": "shrink-50"})
    assert distill.status_code == 422 and "upload a dataset" in distill.json()["error"]
    accuracy = client.post("/models/bare/compressions", json={"recipe": "int8-dynamic",
                                                              "budget": {"metric": "accuracy"}})
    assert accuracy.status_code == 422 and "labels" in accuracy.json()["error"]
    assert client.post("/models/ghost/compressions", json={"recipe": "int8-dynamic"}).status_code == 404
    assert upload(client, "cnn", CNN).status_code == 201
    other = client.post("/models/cnn/datasets", files={"file": ("d.npz", CNN_SAMPLES.read_bytes())}).json()
    wrong_model = client.post("/models/bare/compressions", json={"recipe": "int8-static", "dataset": other["id"]})
    assert wrong_model.status_code == 422 and "datasets belong to one model" in wrong_model.json()["error"]


def test_a_recipe_that_cannot_apply_is_refused_at_submission(client: TestClient, tmp_path: Path) -> None:
    convs = convolutions_only(tmp_path / "convs.onnx")
    assert upload(client, "convs", convs).status_code == 201
    refused = client.post("/models/convs/compressions", json={"recipe": "int4-weight"})
    assert refused.status_code == 422 and refused.json()["code"] == "recipe_not_applicable"
    assert "int4 needs MatMul or Gemm layers" in refused.json()["error"]
    assert client.get("/jobs").json()["jobs"] == []


def test_job_failing_in_the_worker_says_why(client: TestClient) -> None:
    assert upload(client, "cnn", CNN, CNN_SAMPLES).status_code == 201
    # zeroing half the weights moves the outputs: no cosine budget of zero is met, so nothing is kept
    job = client.post("/models/cnn/compressions", json={
        "recipe": "prune-50", "promote": True, "budget": {"metric": "cosine", "max_drop": 0.0}}).json()
    done = wait_for_job(client, job["id"])
    assert done["state"] == "failed" and "misses the budget" in done["error"]
    assert [v["name"] for v in client.get("/models/cnn/variants").json()["variants"]] == ["original"]
    assert client.delete(f"/jobs/{job['id']}").status_code == 409  # finished jobs cannot be cancelled
    assert client.get("/jobs/unknown-id").status_code == 404


def test_cancel_a_running_job(client: TestClient, settings: Settings) -> None:
    samples = npz_bytes(input=np.load(CNN_SAMPLES)["input"], labels=np.load(CNN_SAMPLES)["labels"])
    assert upload(client, "cnn", CNN, samples).status_code == 201
    long_recipe = {"steps": [{"op": "prune", "mode": "structured", "sparsity": 0.5},
                             {"op": "distill", "epochs": 1000, "patience": 100}]}
    job = client.post("/models/cnn/compressions", json={"recipe": long_recipe}).json()
    wait_for_state(client, job["id"], "running")
    cancelled = client.delete(f"/jobs/{job['id']}")
    assert cancelled.status_code == 202 and cancelled.json()["cancel_requested"] is True
    done = wait_for_job(client, job["id"], timeout=30)
    assert done["state"] == "cancelled"
    assert [v["name"] for v in client.get("/models/cnn/variants").json()["variants"]] == ["original"]
    leftovers = [p for p in (settings.data_dir / "tmp").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_cancel_a_queued_job_and_delete_a_model_with_jobs(make_settings) -> None:  # type: ignore[no-untyped-def]
    from app.main import create_app

    with TestClient(create_app(make_settings(embedded_workers=1))) as client:
        assert upload(client, "mlp", MLP, MLP_SAMPLES).status_code == 201
        long_recipe = {"steps": [{"op": "distill", "epochs": 1000, "patience": 100}]}
        first = client.post("/models/mlp/compressions", json={"recipe": long_recipe}).json()
        second = client.post("/models/mlp/compressions", json={"recipe": "int8-dynamic"}).json()
        wait_for_state(client, first["id"], "running")
        assert client.get(f"/jobs/{second['id']}").json()["state"] == "queued"
        assert client.delete(f"/jobs/{second['id']}").json()["state"] == "cancelled"
        assert client.delete("/models/mlp").status_code == 204
        assert wait_for_job(client, first["id"], timeout=30)["state"] == "cancelled"


def test_transformer_pruning_and_qat_requests_that_cannot_run_are_refused_at_submission(client: TestClient) -> None:
    assert upload(client, "cnn", CNN, CNN_SAMPLES).status_code == 201
    heads = client.post("/models/cnn/compressions", json={
        "recipe": {"steps": [{"op": "prune", "mode": "heads", "sparsity": 0.5}]}})
    assert heads.status_code == 422 and heads.json()["code"] == "recipe_not_applicable"
    assert "attention can be identified" in heads.json()["error"] and "no Softmax" in heads.json()["error"]
    whole = client.post("/models/cnn/compressions", json={
        "recipe": {"steps": [{"op": "prune", "mode": "heads", "sparsity": 1.0}]}})
    assert whole.status_code == 422 and "sparsity" in whole.json()["error"]
    assert upload(client, "bare", MLP).status_code == 201  # no dataset
    qat = client.post("/models/bare/compressions", json={
        "recipe": {"steps": [{"op": "quantize", "mode": "static", "qat": {"epochs": 2}}]}})
    assert qat.status_code == 422 and "quantization-aware training" in qat.json()["error"]
    assert client.get("/jobs").json()["jobs"] == []
