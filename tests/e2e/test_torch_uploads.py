"""PyTorch uploads through a real server: converted by a job, served with PyTorch's numbers, pickles refused."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests import torch_files
from tests.e2e.test_cli import _cli
from tests.helpers import CNN_SAMPLES, TRANSFORMER_SAMPLES, npz_bytes
from tests.processes import Server
from tests.torch_files import TorchProcess

pytestmark = pytest.mark.e2e


@pytest.fixture
def files(torch_model_files: dict[str, Path]) -> dict[str, Path]:
    return torch_model_files


def _upload(url: str, name: str, file: Path, **fields: Any) -> httpx.Response:
    files: dict[str, Any] = {"file": (file.name, file.read_bytes())}
    if "samples" in fields:
        files["samples"] = ("samples.npz", fields.pop("samples"))
    return httpx.post(f"{url}/models", data={"name": name, **fields}, files=files, timeout=60)


def _settled(url: str, name: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        model: dict[str, Any] = httpx.get(f"{url}/models/{name}").json()
        if model["state"] != "converting":
            return model
        time.sleep(0.3)
    raise AssertionError(f"{name} still converting after {timeout} s")


def _predict(url: str, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    response = httpx.post(f"{url}/models/{name}/predict",
                          json={"inputs": {k: v.tolist() for k, v in feeds.items()}}, timeout=30)
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["outputs"]["output"], np.float32)


def test_pt2_and_torchscript_uploads_serve_pytorch_predictions(server_factory: Callable[..., Server],
                                                               files: dict[str, Path], torch_process: TorchProcess,
                                                               tmp_path: Path) -> None:
    # One of each format and each network through the server; tests/formats converts all four combinations.
    url = server_factory(tmp_path / "data").url
    with np.load(CNN_SAMPLES) as archive:
        images, labels = archive["input"][:32], archive["labels"][:32]
    with np.load(TRANSFORMER_SAMPLES) as archive:
        tokens = {k: archive[k][:6] for k in ("input_ids", "attention_mask")}
    uploads = {
        "cnn-pt2": _upload(url, "cnn-pt2", files["cnn.pt2"], samples=npz_bytes(x=images, labels=labels)),
        "tr-ts": _upload(url, "tr-ts", files["transformer.pt"],
                         input_shapes=json.dumps(torch_files.TRANSFORMER_INPUT)),
    }
    for response in uploads.values():
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["state"] == "converting" and body["variants"] == [] and body["conversion"]["state"] == "queued"
    # Uploaded last, so still queued behind the other: refused with the reason, and the server keeps serving.
    before_ready = httpx.post(f"{url}/models/tr-ts/predict", json={"inputs": {}})
    assert before_ready.status_code == 503 and "converting" in before_ready.json()["error"]

    model = _settled(url, "cnn-pt2")
    assert model["state"] == "ready", model
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert model["conversion"]["max_abs_error"] < 1e-4 and model["conversion"]["dynamic_axes"] == {"x": [0]}
    got = _predict(url, "cnn-pt2", {"x": images})
    assert np.max(np.abs(got - torch_process.call(torch_files.reference, files["cnn.pt2"], {"x": images}))) < 1e-4
    assert [d["name"] for d in model["datasets"]] == ["samples"]  # the samples became its dataset

    model = _settled(url, "tr-ts")
    assert model["state"] == "ready", model
    assert [i["shape"] for i in model["inputs"]] == [[-1, -1], [-1, -1]]
    got = _predict(url, "tr-ts", tokens)
    assert np.max(np.abs(got - torch_process.call(torch_files.reference, files["transformer.pt"], tokens))) < 1e-4

    jobs = httpx.get(f"{url}/jobs").json()["jobs"]
    assert sorted(j["model"] for j in jobs if j["recipe"] == "convert" and j["state"] == "succeeded") == sorted(
        uploads)
    compressed = httpx.post(f"{url}/models/cnn-pt2/compressions", json={"recipe": "int8-dynamic"})
    assert compressed.status_code == 202


def test_pickles_and_bad_conversions_are_refused_in_words(server_factory: Callable[..., Server],
                                                          files: dict[str, Path], tmp_path: Path) -> None:
    url = server_factory(tmp_path / "data").url
    for pickle_file in ("state_dict.pt", "module.pt"):
        refused = _upload(url, "pickled", files[pickle_file])
        assert refused.status_code == 415 and "pickle" in refused.json()["error"]
        assert "torch.export.save" in refused.json()["error"]
    no_example = _upload(url, "ts", files["cnn.pt"])
    assert no_example.status_code == 422 and "input_shapes" in no_example.json()["error"]
    bad_shapes = _upload(url, "ts", files["cnn.pt"], input_shapes='{"x": [0]}')
    assert bad_shapes.status_code == 422 and "input_shapes" in bad_shapes.json()["error"]
    assert httpx.get(f"{url}/models").json()["models"] == []

    # Accepted, but the samples name no input of the module: the conversion fails and says why.
    wrong = _upload(url, "wrong", files["cnn.pt"], samples=npz_bytes(pixels=np.zeros((4, 1, 8, 8), np.float32)))
    assert wrong.status_code == 201
    model = _settled(url, "wrong")
    assert model["state"] == "failed" and "no array for input(s) x" in model["error"]
    predict = httpx.post(f"{url}/models/wrong/predict", json={"inputs": {"x": [[[[0.0] * 8] * 8]]}})
    assert predict.status_code == 503 and "failed" in predict.json()["error"]
    assert httpx.delete(f"{url}/models/wrong").status_code == 204


def test_cli_upload_follows_the_conversion(server_factory: Callable[..., Server], files: dict[str, Path],
                                          tmp_path: Path) -> None:
    url = server_factory(tmp_path / "data").url
    uploaded = _cli("upload", str(files["cnn.pt"]), "--name", "cnn", "--input-shapes",
                    json.dumps(torch_files.CNN_INPUT), url=url)
    assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
    assert "converted from torchscript: max abs error" in uploaded.stdout
    assert "input x: FP32 [-1, 1, 8, 8]" in uploaded.stdout
    failed = _cli("upload", str(files["cnn.pt"]), "--name", "bad", "--input-shapes", '{"x": ["batch", 3, 8, 8]}',
                  url=url)
    assert failed.returncode == 1 and "conversion failed" in failed.stdout
