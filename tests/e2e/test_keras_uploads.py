"""Keras uploads through a real server: converted by a job, served with Keras' numbers, hostile files refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.test_torch_uploads import _settled, _upload
from tests.processes import Server

pytestmark = pytest.mark.e2e


def _predict(url: str, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    response = httpx.post(f"{url}/models/{name}/predict",
                          json={"inputs": {k: v.tolist() for k, v in feeds.items()}}, timeout=30)
    assert response.status_code == 200, response.text
    return {k: np.asarray(v, np.float32) for k, v in response.json()["outputs"].items()}


def test_keras_uploads_serve_keras_predictions(server_factory: Callable[..., Server],
                                               keras_model_files: dict[str, Path], tmp_path: Path) -> None:
    url = server_factory(tmp_path / "data").url
    files = keras_model_files
    for name, file in [("cnn-keras", "cnn.keras"), ("cnn-h5", "cnn.h5"), ("two", "two.keras"),
                       ("rnn", "rnn.keras")]:
        response = _upload(url, name, files[file])
        assert response.status_code == 201, response.text
        assert response.json()["conversion"]["state"] == "queued"
    for name, expected_file in [("cnn-keras", "cnn"), ("cnn-h5", "cnn"), ("two", "two"), ("rnn", "rnn")]:
        model = _settled(url, name, timeout=300)
        assert model["state"] == "ready", model
        with np.load(files[f"{expected_file}.expected.npz"]) as archive:
            expected = {key: archive[key] for key in archive.files}
        feeds = {spec["name"]: expected[spec["name"]] for spec in model["inputs"]}
        (got,) = _predict(url, name, feeds).values()
        np.testing.assert_allclose(got, expected["output"], atol=1e-5)
    rnn = httpx.get(f"{url}/models/rnn").json()
    assert rnn["inputs"] == [{"name": "sequence", "datatype": "FP32", "shape": [-1, -1, 6]}]
    assert rnn["conversion"]["keras"]["layers"]["LSTM"] == 1 and rnn["conversion"]["max_abs_error"] < 1e-4
    two = httpx.get(f"{url}/models/two").json()
    assert [spec["name"] for spec in two["inputs"]] == ["numbers", "flags"]


def test_hostile_keras_file_is_refused_stores_nothing_and_runs_nothing(
        server_factory: Callable[..., Server], keras_model_files: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    url = server_factory(data).url
    response = _upload(url, "evil", keras_model_files["lambda.keras"])
    assert response.status_code == 422, response.text
    assert "layer 'lambda' (Lambda) is refused" in response.json()["error"]
    assert httpx.get(f"{url}/models/evil").status_code == 404
    assert [p for p in (data / "artifacts").rglob("*") if p.is_file()] == []
    tflite = tmp_path / "model.tflite"
    tflite.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))
    refused = _upload(url, "lite", tflite)
    assert refused.status_code == 415 and "save the model with model.save('model.keras')" in refused.json()["error"]
    # The server keeps serving, and the Lambda's code never ran anywhere.
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    assert not (keras_model_files["lambda.keras"].parent / "lambda-ran").exists()
