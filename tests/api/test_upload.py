from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.conftest import upload
from tests.helpers import (
    CNN,
    CNN_SAMPLES,
    MLP,
    MLP_SAMPLES,
    external_data_model,
    fails_on_zeros_model,
    npz_bytes,
    odd_names_model,
    recursive_function_model,
    tensor_bomb_model,
    unknown_op_model,
)


def _stored_files(settings: Settings) -> list[str]:
    root = settings.data_dir / "artifacts"
    return sorted(p.name for p in root.rglob("*") if p.is_file())


def _temp_parts(settings: Settings) -> list[Path]:
    return list((settings.data_dir / "tmp").glob("*.part"))


def test_upload_reports_the_model_and_stores_it_by_content(client: TestClient, settings: Settings) -> None:
    response = upload(client, "mlp", MLP, MLP_SAMPLES)
    assert response.status_code == 201, response.text
    body = response.json()
    import hashlib

    sha = hashlib.sha256(MLP.read_bytes()).hexdigest()
    assert body["name"] == "mlp" and body["state"] == "ready" and body["format"] == "onnx"
    assert body["sha256"] == sha and body["size_bytes"] == MLP.stat().st_size
    assert body["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert body["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert body["opset"] == 18 and body["parameters"] == 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    assert [v["name"] for v in body["variants"]] == ["original"]
    assert body["routing"]["default"] == "original"
    assert body["datasets"][0]["samples"] == 450 and body["datasets"][0]["has_labels"] is True
    assert f"{sha}.onnx" in _stored_files(settings)
    assert _temp_parts(settings) == []
    assert client.get("/models/mlp").json()["sha256"] == sha
    assert [m["name"] for m in client.get("/models").json()["models"]] == ["mlp"]


def test_same_content_under_two_names_is_stored_once(client: TestClient, settings: Settings) -> None:
    assert upload(client, "one", MLP).status_code == 201
    assert upload(client, "two", MLP).status_code == 201
    assert _stored_files(settings).count(client.get("/models/one").json()["sha256"] + ".onnx") == 1
    assert client.delete("/models/one").status_code == 204
    # The file is still needed by 'two'.
    assert client.post("/models/two/predict", json={"inputs": [[0.0] * 64]}).status_code == 200
    assert client.delete("/models/two").status_code == 204
    assert _stored_files(settings) == []


def test_odd_tensor_names_scalars_and_dynamic_middle_dims(client: TestClient) -> None:
    response = upload(client, "odd", odd_names_model())
    assert response.status_code == 201, response.text
    inputs = response.json()["inputs"]
    assert inputs == [{"name": "enc/in:0", "datatype": "FP32", "shape": [2, -1, 4]},
                      {"name": "scale.factor", "datatype": "FP32", "shape": []}]
    result = client.post("/models/odd/predict", json={"inputs": {
        "enc/in:0": np.ones((2, 5, 4)).tolist(), "scale.factor": 3.0}})
    assert result.status_code == 200, result.text
    assert np.array(result.json()["outputs"]["out/y:0"]).shape == (2, 5, 4)
    assert result.json()["outputs"]["out/y:0"][0][0] == [3.0] * 4
    missing = client.post("/v2/models/odd/infer", json={"inputs": [
        {"name": "scale.factor", "shape": [], "datatype": "FP32", "data": [2.0]}]})
    assert missing.status_code == 400 and "missing input(s): 'enc/in:0'" in missing.json()["error"]


def test_model_that_fails_on_zeros_is_accepted_with_a_warning(client: TestClient) -> None:
    response = upload(client, "ranged", fails_on_zeros_model())
    assert response.status_code == 201, response.text
    assert "all-zero" in response.json()["warnings"][0]
    result = client.post("/models/ranged/predict", json={"inputs": {"step": 5}})
    assert result.json()["outputs"]["r"] == [0, 5]


def test_scalar_inputs_take_one_sample_each(client: TestClient) -> None:
    response = upload(client, "ranged", fails_on_zeros_model(), npz_bytes(step=np.array([2, 3, 5], np.int64)))
    assert response.status_code == 201, response.text
    assert response.json()["warnings"] == [] and response.json()["datasets"][0]["samples"] == 3


def test_samples_that_break_the_model_are_refused(client: TestClient, settings: Settings) -> None:
    response = upload(client, "ranged", fails_on_zeros_model(), npz_bytes(step=np.zeros(3, np.int64)))
    assert response.status_code == 422
    assert "fails on the uploaded samples" in response.json()["error"]
    assert _stored_files(settings) == []


def _pickle_pt() -> bytes:
    return pickle.dumps({"state_dict": {"w": [1.0, 2.0]}}, protocol=4)


BAD_UPLOADS = [
    ("empty", b"", "model.onnx", 422, "is empty"),
    ("truncated", MLP.read_bytes()[: MLP.stat().st_size // 2], "model.onnx", 422, "not a valid ONNX"),
    ("random", np.random.default_rng(1).bytes(4096), "model.onnx", 422, "ONNX"),
    ("pickle", _pickle_pt(), "model.pt", 415, "pickle"),
    ("escape", external_data_model("../../etc/passwd"), "model.onnx", 422, "outside the upload"),
    ("absolute", external_data_model("/etc/passwd"), "model.onnx", 422, "outside the upload"),
    ("sidecar", external_data_model("weights.bin"), "model.onnx", 422, "not part of the upload"),
    ("unknown-op", unknown_op_model(""), "model.onnx", 422, "FrobnicateTensor"),
    ("custom-domain", unknown_op_model("com.example"), "model.onnx", 422, "onnxruntime cannot load"),
    ("text-file", b"hello", "notes.txt", 415, "extension '.txt'"),
    ("tensor-bomb", tensor_bomb_model(), "model.onnx", 422, "too small for the declared shape"),
    ("recursive-functions", recursive_function_model(), "model.onnx", 422, "must not be recursive"),
    # A length prefix claiming 2 GB of repeated data in a file of a few kilobytes.
    ("protobuf-bomb", MLP.read_bytes() + b"\x3a\xff\xff\xff\xff\x07", "model.onnx", 422, "not a valid ONNX"),
]


@pytest.mark.parametrize(("case", "content", "filename", "status", "message"), BAD_UPLOADS,
                         ids=[b[0] for b in BAD_UPLOADS])
def test_bad_model_files_are_refused_and_nothing_is_stored(
    mlp_client: TestClient, settings: Settings, case: str, content: bytes, filename: str, status: int,
    message: str,
) -> None:
    before = _stored_files(settings)
    response = upload(mlp_client, "bad", content, filename=filename)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert response.json()["code"]
    assert mlp_client.get("/models/bad").status_code == 404
    assert _stored_files(settings) == before
    assert _temp_parts(settings) == []
    # The server keeps serving what it had.
    assert mlp_client.post("/models/mlp/predict", json={"inputs": [[0.0] * 64]}).status_code == 200


@pytest.mark.parametrize("name", ["../x", "Upper", "a" * 200, "", "-lead", "a/b", "/etc/passwd", "x\x00y", "ｍodel",
                                  ".hidden", "C:\\x"])
def test_invalid_names_are_refused(client: TestClient, settings: Settings, name: str) -> None:
    response = upload(client, name, MLP)
    assert response.status_code == 422
    assert "invalid model name" in response.json()["error"]
    assert _stored_files(settings) == []


def test_duplicate_name_is_a_conflict_and_keeps_the_first(mlp_client: TestClient) -> None:
    first = mlp_client.get("/models/mlp").json()["sha256"]
    response = upload(mlp_client, "mlp", CNN)
    assert response.status_code == 409 and "already exists" in response.json()["error"]
    assert mlp_client.get("/models/mlp").json()["sha256"] == first


def test_upload_over_the_limit_is_refused(make_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(max_upload_bytes=50_000)
    with TestClient(create_app(settings)) as client:
        response = upload(client, "big", MLP)  # 71 kB
        assert response.status_code == 413
        assert "limit of 50000 bytes" in response.json()["error"] or "limit is 50000" in response.json()["error"]
        assert _stored_files(settings) == [] and _temp_parts(settings) == []


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        (npz_bytes(wrong=np.zeros((2, 64), np.float32)), "array 'wrong'"),
        (npz_bytes(input=np.zeros((2, 63), np.float32)), "axis 1"),
        (npz_bytes(input=np.zeros((2, 64, 1), np.float32)), "rank 3"),
        (npz_bytes(input=np.array([["a"] * 64] * 2)), "dtype"),
        (npz_bytes(input=np.zeros((2, 64), np.float32), labels=np.zeros(3, np.int64)), "same number"),
        (npz_bytes(labels=np.zeros(3, np.int64)), "no array for input"),
        (b"not a zip", "not an .npz"),
    ],
)
def test_samples_that_do_not_match_the_model_are_refused(
    client: TestClient, settings: Settings, samples: bytes, message: str
) -> None:
    response = upload(client, "mlp", MLP, samples)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]
    assert client.get("/models/mlp").status_code == 404
    assert _stored_files(settings) == []


def test_object_arrays_in_samples_are_never_unpickled(client: TestClient) -> None:
    samples = npz_bytes(input=np.array([object()] * 64, dtype=object).reshape(1, 64))
    response = upload(client, "mlp", MLP, samples)
    assert response.status_code == 422 and "never unpickled" in response.json()["error"]


def test_form_problems_are_named(client: TestClient) -> None:
    no_file = client.post("/models", data={"name": "x"}, files={"samples": ("s.npz", b"x")})
    assert no_file.status_code == 400 and "'file' is required" in no_file.json()["error"]
    extra = client.post("/models", data={"name": "x", "colour": "red"}, files={"file": ("m.onnx", b"x")})
    assert extra.status_code == 400 and "colour" in extra.json()["error"]
    not_multipart = client.post("/models", json={"name": "x"})
    assert not_multipart.status_code == 415


def test_datasets_are_added_listed_and_checked(mlp_client: TestClient) -> None:
    samples = npz_bytes(input=np.random.default_rng(0).random((5, 64), dtype=np.float32))
    created = mlp_client.post("/models/mlp/datasets", data={"name": "traffic"},
                              files={"file": ("t.npz", samples)})
    assert created.status_code == 201, created.text
    assert created.json()["samples"] == 5 and created.json()["has_labels"] is False
    names = [d["name"] for d in mlp_client.get("/models/mlp/datasets").json()["datasets"]]
    assert names == ["samples", "traffic"]
    again = mlp_client.post("/models/mlp/datasets", data={"name": "traffic"}, files={"file": ("t.npz", samples)})
    assert again.status_code == 409
    other_model = npz_bytes(input=np.zeros((5, 1, 8, 8), np.float32))  # the CNN's input
    wrong = mlp_client.post("/models/mlp/datasets", files={"file": ("c.npz", other_model)})
    assert wrong.status_code == 422 and "rank 4" in wrong.json()["error"]
    assert mlp_client.post("/models/nope/datasets", files={"file": ("t.npz", samples)}).status_code == 404


def test_variants_and_artifact_download(mlp_client: TestClient) -> None:
    variants = mlp_client.get("/models/mlp/variants").json()["variants"]
    assert [v["name"] for v in variants] == ["original"]
    artifact = mlp_client.get("/models/mlp/variants/original/artifact")
    assert artifact.status_code == 200 and artifact.content == MLP.read_bytes()
    assert mlp_client.get("/models/mlp/variants/int8/artifact").status_code == 404
    assert mlp_client.delete("/models/mlp/variants/original").status_code == 409
    assert mlp_client.delete("/models/mlp/variants/int8").status_code == 404


def test_cnn_with_samples(client: TestClient) -> None:
    response = upload(client, "digits", CNN, CNN_SAMPLES)
    assert response.status_code == 201, response.text
    assert response.json()["inputs"][0]["shape"] == [-1, 1, 8, 8]


class _Planted:
    """Unpickling this would create a file: proof of code execution if it ever appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _zip(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    import io
    import stat
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        if symlink is not None:
            info = zipfile.ZipInfo("archive/data/link")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, symlink)
    return buffer.getvalue()


@pytest.mark.parametrize("filename", ["model.pt", "model.pt2", "model.onnx"])
def test_planted_pickles_and_archives_never_execute(client: TestClient, settings: Settings, tmp_path: Path,
                                                   filename: str) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Planted(marker))
    for content in (payload, _zip({"archive/data.pkl": payload}),
                    _zip({"archive/data.pkl": payload, "archive/code/m.py": b""}, symlink="/etc/passwd")):
        response = upload(client, "evil", content, filename=filename)
        assert response.status_code == 415, response.text
        assert not marker.exists()
    assert _stored_files(settings) == []


def test_samples_that_unpack_beyond_the_limit_are_refused(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.formats import datasets

    monkeypatch.setattr(datasets, "MAX_UNCOMPRESSED_BYTES", 1000)  # a real bomb would need gigabytes on disk
    response = upload(client, "mlp", MLP, npz_bytes(input=np.zeros((100, 64), np.float32)))
    assert response.status_code == 413 and "unpacks to" in response.json()["error"]
    assert client.get("/models/mlp").status_code == 404
