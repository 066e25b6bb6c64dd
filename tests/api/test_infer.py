from __future__ import annotations

import gzip

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from app.settings import Settings
from tests.conftest import upload
from tests.helpers import MLP, MLP_SAMPLES, identity_model

SAMPLES = np.load(MLP_SAMPLES)["input"]


def _reference(rows: np.ndarray) -> np.ndarray:
    return np.asarray(ort.InferenceSession(str(MLP)).run(None, {"input": rows})[0])


def _v2(rows: np.ndarray, **extra: object) -> dict[str, object]:
    return {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                        "data": rows.ravel().tolist()}], **extra}


def _samples_of(metrics_text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_v2_json_infer_matches_onnxruntime(mlp_client: TestClient) -> None:
    rows = SAMPLES[:4]
    response = mlp_client.post("/v2/models/mlp/infer", content=orjson.dumps(_v2(rows, id="req-7")))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "mlp" and body["model_version"] == "original" and body["id"] == "req-7"
    output = body["outputs"][0]
    assert output["name"] == "logits" and output["shape"] == [4, 10] and output["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(output["data"]).reshape(4, 10), _reference(rows), rtol=1e-6)
    assert response.headers["x-variant"] == "original"
    timing = response.headers["server-timing"]
    assert "queue;dur=" in timing and "infer;dur=" in timing and "total;dur=" in timing


def test_v2_binary_request_and_response(mlp_client: TestClient) -> None:
    rows = SAMPLES[:3]
    header = orjson.dumps({"inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32",
                                       "parameters": {"binary_data_size": rows.nbytes}}],
                           "parameters": {"binary_data_output": True}})
    response = mlp_client.post("/v2/models/mlp/infer", content=header + rows.tobytes(),
                               headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    meta = orjson.loads(response.content[:length])["outputs"][0]
    assert meta["parameters"]["binary_data_size"] == 3 * 10 * 4
    values = np.frombuffer(response.content[length:], np.float32).reshape(3, 10)
    np.testing.assert_allclose(values, _reference(rows), rtol=1e-6)


def test_versioned_url_and_gzip_body(mlp_client: TestClient) -> None:
    body = gzip.compress(orjson.dumps(_v2(SAMPLES[:1])))
    response = mlp_client.post("/v2/models/mlp/versions/original/infer", content=body,
                               headers={"Content-Encoding": "gzip"})
    assert response.status_code == 200, response.text
    missing = mlp_client.post("/v2/models/mlp/versions/int8/infer", content=orjson.dumps(_v2(SAMPLES[:1])))
    assert missing.status_code == 404 and "no variant 'int8'" in missing.json()["error"]


def test_plain_predict(mlp_client: TestClient) -> None:
    response = mlp_client.post("/models/mlp/predict", json={"inputs": {"input": SAMPLES[:2].tolist()}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "mlp" and body["variant"] == "original" and body["latency_ms"] > 0
    np.testing.assert_allclose(np.array(body["outputs"]["logits"]), _reference(SAMPLES[:2]), rtol=1e-6)
    pinned = mlp_client.post("/models/mlp/predict", json={"inputs": [[0.0] * 64], "variant": "original"})
    assert pinned.status_code == 200
    unknown = mlp_client.post("/models/mlp/predict", json={"inputs": [[0.0] * 64], "variant": "fast"})
    assert unknown.status_code == 404


def test_v2_metadata_and_readiness(mlp_client: TestClient) -> None:
    assert mlp_client.get("/v2/health/live").json() == {"live": True}
    assert mlp_client.get("/v2/health/ready").json() == {"ready": True}
    assert "binary_tensor_data" in mlp_client.get("/v2").json()["extensions"]
    meta = mlp_client.get("/v2/models/mlp").json()
    assert meta["versions"] == ["original"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert mlp_client.get("/v2/models/mlp/ready").json()["ready"] is True
    assert mlp_client.get("/v2/models/mlp/versions/original/ready").status_code == 200
    assert mlp_client.get("/v2/models/nope/ready").status_code == 404
    assert mlp_client.get("/v2/models/mlp/versions/x").status_code == 404


@pytest.mark.parametrize("datatype", ["BOOL", "FP16", "UINT8", "INT64", "FP64", "BYTES"])
def test_every_datatype_through_the_server(client: TestClient, datatype: str) -> None:
    assert upload(client, "ident", identity_model(datatype)).status_code == 201
    data = {"BOOL": [True, False, True], "BYTES": ["a", "bé", ""]}.get(datatype, [1, 2, 3])
    request = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": datatype, "data": data}]}
    response = client.post("/v2/models/ident/infer", content=orjson.dumps(request))
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    assert output["datatype"] == datatype and output["data"] == data


BAD_REQUESTS = [
    ("missing input", {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}, 400, "unknown input"),
    ("extra input", {"inputs": [_v2(SAMPLES[:1])["inputs"][0],  # type: ignore[index]
                                {"name": "extra", "shape": [1], "datatype": "FP32", "data": [1]}]}, 400,
     "unknown input 'extra'"),
    ("wrong rank", {"inputs": [{"name": "input", "shape": [64], "datatype": "FP32", "data": [0] * 64}]}, 400,
     "rank 1"),
    ("wrong fixed dim", {"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": [0] * 32}]},
     400, "expects 64"),
    ("wrong datatype", {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "INT64", "data": [0] * 64}]},
     400, "expects FP32"),
    ("length mismatch", {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": [0] * 64}]},
     400, "needs 128"),
    ("strings", {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ["x"] * 64}]}, 400,
     "numbers only"),
    ("batch over limit", {"inputs": [{"name": "input", "shape": [9, 64], "datatype": "FP32", "data": [0] * 576}]},
     413, "limit is 8"),
    ("unknown output", {**_v2(SAMPLES[:1]), "outputs": [{"name": "probs"}]}, 400, "unknown output 'probs'"),
]


@pytest.mark.parametrize(("case", "payload", "status", "message"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_inference_requests(make_settings, case: str, payload: dict, status: int, message: str) -> None:  # type: ignore[no-untyped-def,type-arg]
    with TestClient(create_app(make_settings(max_batch_size=8))) as client:
        assert upload(client, "mlp", MLP).status_code == 201
        response = client.post("/v2/models/mlp/infer", content=orjson.dumps(payload))
        assert response.status_code == status, response.text
        assert message in response.json()["error"]
        good = client.post("/v2/models/mlp/infer", content=orjson.dumps(_v2(SAMPLES[:1])))
        assert good.status_code == 200


def test_malformed_bodies(mlp_client: TestClient) -> None:
    invalid_json = mlp_client.post("/v2/models/mlp/infer", content=b"{\"inputs\": [")
    assert invalid_json.status_code == 400 and "not valid JSON" in invalid_json.json()["error"]
    header = orjson.dumps(_v2(SAMPLES[:1]))
    lying = mlp_client.post("/v2/models/mlp/infer", content=header,
                            headers={"Inference-Header-Content-Length": str(len(header) + 100)})
    assert lying.status_code == 400 and "Inference-Header-Content-Length" in lying.json()["error"]
    short = mlp_client.post("/v2/models/mlp/infer", content=header,
                            headers={"Inference-Header-Content-Length": "10"})
    assert short.status_code == 400
    unknown_model = mlp_client.post("/v2/models/nope/infer", content=header)
    assert unknown_model.status_code == 404 and "model 'nope' not found" in unknown_model.json()["error"]
    bad_gzip = mlp_client.post("/v2/models/mlp/infer", content=b"plain", headers={"Content-Encoding": "gzip"})
    assert bad_gzip.status_code == 400


def test_request_body_over_the_limit(make_settings) -> None:  # type: ignore[no-untyped-def]
    with TestClient(create_app(make_settings(max_request_bytes=1000))) as client:
        assert upload(client, "mlp", MLP).status_code == 201
        response = client.post("/v2/models/mlp/infer", content=orjson.dumps(_v2(SAMPLES[:4])))
        assert response.status_code == 413 and "limit" in response.json()["error"]
        bomb = gzip.compress(b"[" + b"0," * 100_000 + b"0]")
        response = client.post("/v2/models/mlp/infer", content=bomb, headers={"Content-Encoding": "gzip"})
        assert response.status_code == 413 and "decompressed" in response.json()["error"]


def test_metrics_count_exactly_the_requests(mlp_client: TestClient) -> None:
    for _ in range(5):
        assert mlp_client.post("/v2/models/mlp/infer", content=orjson.dumps(_v2(SAMPLES[:2]))).status_code == 200
    for _ in range(3):
        assert mlp_client.post("/models/mlp/predict", json={"inputs": [[0.0] * 64]}).status_code == 200
    assert mlp_client.post("/v2/models/mlp/infer", content=b"nope").status_code == 400
    text = mlp_client.get("/metrics").text
    counts = _samples_of(text, "slimserve_request_duration_seconds_count")
    labels_v2 = (("model", "mlp"), ("protocol", "v2"), ("variant", "original"))
    labels_predict = (("model", "mlp"), ("protocol", "predict"), ("variant", "original"))
    assert counts[labels_v2] == 6  # five answered, one refused
    assert counts[labels_predict] == 3
    totals = _samples_of(text, "slimserve_requests_total")
    assert totals[(("code", "200"), ("model", "mlp"), ("protocol", "v2"), ("variant", "original"))] == 5
    assert totals[(("code", "400"), ("model", "mlp"), ("protocol", "v2"), ("variant", "original"))] == 1
    inference = _samples_of(text, "slimserve_inference_duration_seconds_count")
    assert inference[(("model", "mlp"), ("variant", "original"))] == 8
    batch_sum = _samples_of(text, "slimserve_batch_size_sum")
    assert batch_sum[(("model", "mlp"), ("variant", "original"))] == 5 * 2 + 3
    size = _samples_of(text, "slimserve_model_size_bytes")
    assert size[(("model", "mlp"), ("variant", "original"))] == MLP.stat().st_size


def test_deleted_model_stops_answering(mlp_client: TestClient, settings: Settings) -> None:
    assert mlp_client.post("/models/mlp/predict", json={"inputs": [[0.0] * 64]}).status_code == 200
    assert mlp_client.delete("/models/mlp").status_code == 204
    assert mlp_client.post("/models/mlp/predict", json={"inputs": [[0.0] * 64]}).status_code == 404
    assert "model=\"mlp\"" not in mlp_client.get("/metrics").text
    assert mlp_client.delete("/models/mlp").status_code == 404


def test_sessions_beyond_the_memory_cap_close_least_recently_used(make_settings) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers import CNN

    cap = MLP.stat().st_size + CNN.stat().st_size - 1
    with TestClient(create_app(make_settings(max_loaded_bytes=cap))) as client:
        assert upload(client, "mlp", MLP).status_code == 201
        assert upload(client, "cnn", CNN).status_code == 201
        mlp_body = {"inputs": [[0.0] * 64]}
        cnn_body = {"inputs": [[[[0.0] * 8] * 8]]}
        first = client.post("/models/mlp/predict", json=mlp_body).json()["outputs"]
        assert client.post("/models/cnn/predict", json=cnn_body).status_code == 200

        def gauges() -> tuple[float, float]:
            text = client.get("/metrics").text
            return (_samples_of(text, "slimserve_loaded_models")[()], _samples_of(text, "slimserve_loaded_bytes")[()])

        assert gauges() == (1.0, float(CNN.stat().st_size))  # the MLP was closed to make room
        assert client.post("/models/mlp/predict", json=mlp_body).json()["outputs"] == first  # reopened on demand
        assert gauges() == (1.0, float(MLP.stat().st_size))


def test_session_options_per_variant_and_the_optimized_graph_cache(make_settings, caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    settings = make_settings()
    body = {"inputs": SAMPLES[:3].tolist()}
    with TestClient(create_app(settings)) as client:
        assert upload(client, "mlp", MLP).status_code == 201
        default = client.post("/models/mlp/predict", json=body).json()["outputs"]
        update = client.put("/models/mlp/variants/original/session",
                            json={"intra_op_threads": 2, "graph_optimization_level": "extended"})
        assert update.status_code == 200 and update.json()["intra_op_threads"] == 2
        assert client.put("/models/mlp/variants/ghost/session", json={}).status_code == 404
        assert client.put("/models/mlp/variants/original/session",
                          json={"graph_optimization_level": "max"}).status_code == 422
        tuned = client.post("/models/mlp/predict", json=body).json()["outputs"]
        np.testing.assert_allclose(tuned["logits"], default["logits"], rtol=1e-5)
    cached = list((settings.data_dir / "cache" / "sessions").glob("*.t2-extended.optimized.onnx"))
    assert len(cached) == 1
    with caplog.at_level(logging.INFO, logger="app.runtime.sessions"), TestClient(create_app(settings)) as client:
        again = client.post("/models/mlp/predict", json=body).json()["outputs"]
    np.testing.assert_allclose(again["logits"], default["logits"], rtol=1e-5)
    assert any("optimized graph from cache" in record.getMessage() for record in caplog.records)


def test_a_runaway_inference_is_stopped_and_the_server_goes_on(make_settings) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers import spin_model

    with TestClient(create_app(make_settings(inference_timeout_seconds=0.5))) as client:
        assert upload(client, "spin", spin_model()).status_code == 201
        assert client.post("/models/spin/predict", json={"inputs": {"trips": 10}}).json()["outputs"]["total"] == [10.0]
        runaway = client.post("/models/spin/predict", json={"inputs": {"trips": 10**12}})
        assert runaway.status_code == 503 and "longer than 0.5 s" in runaway.json()["error"]
        assert runaway.headers["retry-after"] == "1"
        assert client.post("/models/spin/predict", json={"inputs": {"trips": 3}}).json()["outputs"]["total"] == [3.0]
