"""The Open Inference Protocol over gRPC, against the real server, with the clients users run (tritonclient)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from app.api.grpc_service import inference_pb2 as pb
from tests.helpers import MLP, MLP_SAMPLES, ONNX_TYPES, identity_model, spin_model
from tests.processes import Server, start_server
from tests.worker.helpers import wait_for_job

DATATYPES = sorted(ONNX_TYPES)
READER = "predict:reader-key-0123456789"


def _post_model(server: Server, name: str, model: bytes, samples: bytes | None = None) -> None:
    files: dict[str, Any] = {"file": ("model.onnx", model)}
    if samples is not None:
        files["samples"] = ("samples.npz", samples)
    response = httpx.post(f"{server.url}/models", data={"name": name}, files=files, timeout=60,
                          headers={"authorization": "Bearer admin-key-0123456789"})
    assert response.status_code == 201, response.text


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module: identity models of every datatype, the digits MLP with an INT8 variant, a
    model whose work is an input (for cancelled calls and floods); a reader key for predictions."""
    folder = tmp_path_factory.mktemp("grpc")
    running = start_server(folder / "data", SLIMSERVE_API_KEYS=f"admin:admin-key-0123456789,{READER}",
                           SLIMSERVE_MAX_CONCURRENT_INFERENCES="1",
                           SLIMSERVE_INFERENCE_TIMEOUT_SECONDS="5")
    try:
        for datatype in DATATYPES:
            _post_model(running, f"id-{datatype.lower()}", identity_model(datatype))
        _post_model(running, "mlp", MLP.read_bytes(), MLP_SAMPLES.read_bytes())
        _post_model(running, "spin", spin_model())
        with httpx.Client(base_url=running.url, headers={"authorization": "Bearer admin-key-0123456789"}) as http:
            job = http.post("/models/mlp/compressions", json={"recipe": "int8-dynamic", "variant": "int8"}).json()
            assert wait_for_job(http, job["id"], timeout=180)["state"] == "succeeded"
        yield running
    finally:
        running.stop()


KEY = [("authorization", f"Bearer {READER.split(':', 1)[1]}")]


@pytest.fixture
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.grpc_target) as connected:
        yield connected


def _values(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    if datatype == "BYTES":
        return np.array([f"é{i}".encode() for i in range(int(np.prod(shape)))], dtype=object).reshape(shape)
    dtype = np.dtype(triton.triton_to_np_dtype(datatype))
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


def test_health_and_metadata_rpcs(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()  # health is public by default, as over REST
    metadata = client.get_server_metadata(headers=dict(KEY))
    assert metadata.name == "slimserve" and "binary_tensor_data" in metadata.extensions
    assert client.is_model_ready("mlp", headers=dict(KEY))
    assert client.is_model_ready("mlp", "int8", headers=dict(KEY))
    assert not client.is_model_ready("mlp", "no-such-variant", headers=dict(KEY))
    assert not client.is_model_ready("no-such-model", headers=dict(KEY))
    model = client.get_model_metadata("mlp", headers=dict(KEY))
    assert model.platform == "onnxruntime_onnx" and set(model.versions) == {"original", "int8"}
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("input", "FP32", [-1, 64])]
    assert list(client.get_model_metadata("mlp", "int8", headers=dict(KEY)).versions) == ["int8"]


@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_round_trips(client: triton.InferenceServerClient, datatype: str) -> None:
    values = _values(datatype, (2, 3))
    tensor = triton.InferInput("x", [2, 3], datatype)
    tensor.set_data_from_numpy(values)
    result = client.infer(f"id-{datatype.lower()}", [tensor], headers=dict(KEY), request_id="r-7")
    assert result.get_response().id == "r-7"
    np.testing.assert_array_equal(result.as_numpy("y"), values)


def _typed_call(target: str, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """A client that sends typed `contents` (KServe's Python and Go clients do), on our own stub."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        response: pb.ModelInferResponse = call(request, metadata=KEY, timeout=30)
        return response


@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d != "FP16"])
def test_typed_contents_for_every_datatype(server: Server, datatype: str) -> None:
    values = _values(datatype, (2, 3))
    request = pb.ModelInferRequest(model_name=f"id-{datatype.lower()}")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[2, 3])
    field = {"BOOL": "bool_contents", "INT64": "int64_contents", "UINT64": "uint64_contents",
             "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}.get(
        datatype, "uint_contents" if datatype.startswith("UINT") else "int_contents")
    getattr(tensor.contents, field).extend(values.ravel().tolist())
    response = _typed_call(server.grpc_target, request)
    answer = np.frombuffer(response.raw_output_contents[0], dtype=values.dtype) if datatype != "BYTES" else None
    if answer is not None:
        np.testing.assert_array_equal(answer.reshape(2, 3), values)
    else:
        assert response.raw_output_contents[0].startswith(b"\x03\x00\x00\x00" + "é0".encode())


def test_answers_equal_rest_and_onnxruntime(server: Server, client: triton.InferenceServerClient) -> None:
    rows = np.load(MLP_SAMPLES)["input"][:8]
    want = ort.InferenceSession(str(MLP)).run(None, {"input": rows})[0]
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    result = client.infer("mlp", [tensor], model_version="original", headers=dict(KEY),
                          outputs=[triton.InferRequestedOutput("logits")])
    np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=1e-6, atol=1e-6)
    rest = httpx.post(f"{server.url}/v2/models/mlp/versions/original/infer", headers=dict(KEY), json={
        "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}],
    }).json()["outputs"][0]
    np.testing.assert_allclose(np.asarray(rest["data"], np.float32).reshape(rest["shape"]),
                               result.as_numpy("logits"), rtol=1e-6, atol=1e-6)
    quantized = client.infer("mlp", [tensor], model_version="int8", headers=dict(KEY))
    assert quantized.get_response().model_version == "int8"
    assert (quantized.as_numpy("logits").argmax(1) == want.argmax(1)).mean() >= 0.75


def test_asyncio_client_and_streaming(server: Server) -> None:
    rows = np.load(MLP_SAMPLES)["input"][:4]

    async def calls() -> tuple[list[np.ndarray], list[Any]]:
        async with triton_aio.InferenceServerClient(server.grpc_target) as client:
            assert await client.is_server_ready()
            tensor = triton_aio.InferInput("input", list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows)
            answers = await asyncio.gather(*(client.infer("mlp", [tensor], headers=dict(KEY)) for _ in range(8)))

            async def requests() -> Any:
                for version in ("original", "int8", "no-such-variant"):
                    yield {"model_name": "mlp", "inputs": [tensor], "model_version": version}

            streamed = [item async for item in client.stream_infer(requests(), headers=dict(KEY))]
            return [a.as_numpy("logits") for a in answers], streamed

    answers, streamed = asyncio.run(calls())
    assert all(np.array_equal(a, answers[0]) for a in answers)
    assert [error is None for _, error in streamed] == [True, True, False]
    assert "has no variant 'no-such-variant'" in str(streamed[2][1])
    assert streamed[1][0].get_response().model_version == "int8"


KSERVE_CLIENT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

target, samples, key = sys.argv[1:4]
rows = np.load(samples)["input"][:4]

async def main():
    metadata = [("authorization", key)]
    async with InferenceGRPCClient(url=target) as client:
        health = [await client.is_server_live(headers=metadata), await client.is_server_ready(headers=metadata),
                  await client.is_model_ready("mlp", headers=metadata)]
        answers = {}
        for binary in (False, True):  # typed contents, then raw_input_contents
            tensor = InferInput(name="input", shape=list(rows.shape), datatype="FP32")
            tensor.set_data_from_numpy(rows, binary_data=binary)
            response = await client.infer(InferRequest(model_name="mlp", infer_inputs=[tensor], request_id="k-1"),
                                          headers=metadata)
            output = response.outputs[0]
            answers[str(binary)] = {"name": output.name, "id": response.id,
                                    "values": output.as_numpy().tolist()}
    print(json.dumps({"health": health, "answers": answers}))

asyncio.run(main())
"""


def test_kserve_grpc_client_works_unchanged(server: Server) -> None:
    """KServe's InferenceGRPCClient, typed contents and raw, in its own process (its generated messages and
    tritonclient's share names one protobuf pool cannot hold twice)."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", KSERVE_CLIENT, server.grpc_target, str(MLP_SAMPLES), KEY[0][1]],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["health"] == [True, True, True]
    rows = np.load(MLP_SAMPLES)["input"][:4]
    want = ort.InferenceSession(str(MLP)).run(None, {"input": rows})[0]
    for sent in answer["answers"].values():
        assert sent["name"] == "logits" and sent["id"] == "k-1"
        np.testing.assert_allclose(np.asarray(sent["values"], np.float32), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("tensors", "code", "message"), [
    ([("input", [1, 64], "FP64")], "INVALID_ARGUMENT", "has datatype 'FP64', but the model expects FP32"),
    ([("input", [1, 63], "FP32")], "INVALID_ARGUMENT", "has size 63 on axis 1, but the model expects 64"),
    ([("wrong", [1, 64], "FP32")], "INVALID_ARGUMENT", "unknown input 'wrong'; the model's inputs are: input"),
])
def test_bad_requests_answer_the_rest_message(client: triton.InferenceServerClient, tensors: list[Any],
                                              code: str, message: str) -> None:
    inputs = []
    for name, shape, datatype in tensors:
        tensor = triton.InferInput(name, shape, datatype)
        tensor.set_data_from_numpy(np.zeros(shape, triton.triton_to_np_dtype(datatype)))
        inputs.append(tensor)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("mlp", inputs, headers=dict(KEY))
    assert refused.value.status() == f"StatusCode.{code}" and message in refused.value.message()


def test_unknown_model_version_and_key(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
    cases = [({"model_name": "nope"}, KEY, "StatusCode.NOT_FOUND", "model 'nope' not found"),
             ({"model_name": "mlp", "model_version": "v9"}, KEY, "StatusCode.NOT_FOUND", "has no variant 'v9'"),
             ({"model_name": "mlp"}, [], "StatusCode.UNAUTHENTICATED", "an API key is required"),
             ({"model_name": "mlp"}, [("authorization", "Bearer wrong-key-000")], "StatusCode.UNAUTHENTICATED",
              "the API key is not valid")]
    for call, metadata, code, message in cases:
        with pytest.raises(InferenceServerException) as refused:
            client.infer(inputs=[tensor], headers=dict(metadata), **call)
        assert refused.value.status() == code and message in refused.value.message(), call


def test_both_contents_and_raw_or_raw_of_the_wrong_length(server: Server) -> None:
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend([0.0] * 64)
    request.raw_input_contents.append(b"\0" * 256)
    with pytest.raises(grpc.RpcError) as both:
        _typed_call(server.grpc_target, request)
    assert both.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has both 'contents' and raw_input_contents" in str(both.value.details())
    request.inputs[0].ClearField("contents")
    request.raw_input_contents[0] = b"\0" * 100
    with pytest.raises(grpc.RpcError) as short:
        _typed_call(server.grpc_target, request)
    assert "has 100 bytes of binary data, but FP32 shape [1, 64] needs 256" in str(short.value.details())


def test_a_message_over_the_limit_is_refused_and_the_server_goes_on(
        server: Server, client: triton.InferenceServerClient) -> None:
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[4 * 1024**2, 64])
    request.raw_input_contents.append(bytes(1024**3))  # 1 GiB: past the 64 MiB SLIMSERVE_MAX_REQUEST_BYTES
    with pytest.raises(grpc.RpcError) as refused:
        _typed_call(server.grpc_target, request)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    del request
    assert client.is_model_ready("mlp", headers=dict(KEY))


def _spin(trips: int) -> list[triton.InferInput]:
    tensor = triton.InferInput("trips", [], "INT64")
    tensor.set_data_from_numpy(np.array(trips, np.int64))
    return [tensor]


def test_a_cancelled_call_stops_its_work_and_the_server_goes_on(client: triton.InferenceServerClient) -> None:
    assert client.infer("spin", _spin(10), headers=dict(KEY)).as_numpy("total").tolist() == [10.0]
    pending = client.async_infer("spin", _spin(10**12), callback=lambda result, error: None, headers=dict(KEY))
    time.sleep(0.5)
    pending.cancel()
    # One inference at a time: the next one runs only once the cancelled one has let go of the session,
    # well before the 5 s timeout would have stopped it.
    started = time.monotonic()
    assert client.infer("spin", _spin(3), headers=dict(KEY), client_timeout=10).as_numpy("total").tolist() == [3.0]
    assert time.monotonic() - started < 4.0


def test_a_flood_past_the_queue_is_shed_with_a_retry_hint(tmp_path: Path) -> None:
    small = start_server(tmp_path / "data", SLIMSERVE_MAX_QUEUE="2", SLIMSERVE_MAX_CONCURRENT_INFERENCES="1")

    async def flood() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(small.grpc_target) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                       request_serializer=pb.ModelInferRequest.SerializeToString,
                                       response_deserializer=pb.ModelInferResponse.FromString)
            request = pb.ModelInferRequest(model_name="spin")
            request.inputs.add(name="trips", datatype="INT64", shape=[]).contents.int64_contents.append(200_000)

            async def one() -> grpc.StatusCode:
                try:
                    await call(request, metadata=KEY, timeout=30)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        assert ("retry-after", "1") in tuple(exc.trailing_metadata() or ())
                        assert "requests waiting (SLIMSERVE_MAX_QUEUE=2)" in str(exc.details())
                    return exc.code()

            return await asyncio.gather(*(one() for _ in range(12)))

    try:
        _post_model(small, "spin", spin_model())
        codes = asyncio.run(flood())
    finally:
        small.stop()
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes.count(grpc.StatusCode.OK) >= 2


def test_grpc_requests_are_counted_as_grpc(server: Server, client: triton.InferenceServerClient) -> None:
    def count() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(
            "slimserve_requests_total{") and 'model="mlp"' in line and 'protocol="grpc"' in line
                   and 'code="200"' in line)

    before = count()
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
    for _ in range(3):
        client.infer("mlp", [tensor], headers=dict(KEY))
    assert count() == before + 3


def test_grpc_off_and_a_port_already_taken(tmp_path: Path) -> None:
    off = start_server(tmp_path / "off", SLIMSERVE_GRPC_PORT="0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{off.port}") as channel:  # HTTP only: the HTTP port speaks no gRPC
            with pytest.raises(grpc.FutureTimeoutError):
                grpc.channel_ready_future(channel).result(timeout=1)
        taken = str(off.port)
        with pytest.raises(RuntimeError, match="gRPC cannot listen on 127.0.0.1:" + taken):
            start_server(tmp_path / "clash", SLIMSERVE_GRPC_PORT=taken)
    finally:
        off.stop()
