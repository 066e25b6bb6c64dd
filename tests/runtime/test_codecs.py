from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest

from app.errors import InvalidInput, TooLarge
from app.runtime import codecs
from app.runtime.datatypes import V2_TO_NUMPY, TensorSpec

LIMITS = codecs.Limits(max_batch_size=64, max_tensor_elements=10_000)
SPEC = TensorSpec("x", "FP32", (-1, 3))


def _json_request(**tensor: object) -> bytes:
    base: dict[str, object] = {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}
    base.update(tensor)
    return orjson.dumps({"inputs": [base]})


def _binary_request(arrays: dict[str, np.ndarray], datatypes: dict[str, str], **extra: object) -> tuple[bytes, str]:
    inputs, blobs = [], []
    for name, array in arrays.items():
        blob = _raw(array, datatypes[name])
        inputs.append({"name": name, "shape": list(array.shape), "datatype": datatypes[name],
                       "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    header = orjson.dumps({"inputs": inputs, **extra})
    return header + b"".join(blobs), str(len(header))


def _raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in (x if isinstance(x, bytes) else x.encode()
                                                               for x in array.ravel()))
    return array.astype(V2_TO_NUMPY[datatype]).tobytes()


def _sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    if datatype == "BYTES":
        return np.array([f"s{i}é".encode() for i in range(int(np.prod(shape)))], dtype=object).reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    dtype = V2_TO_NUMPY[datatype]
    if dtype.kind == "f":
        return rng.normal(size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1000), min(info.max, 1000), shape).astype(dtype)


def test_json_flat_and_nested_data_decode_to_the_same_array() -> None:
    flat = codecs.decode_v2(_json_request(), None, {"x": SPEC}, LIMITS)
    nested = codecs.decode_v2(_json_request(data=[[1, 2, 3], [4, 5, 6]]), None, {"x": SPEC}, LIMITS)
    expected = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(flat.inputs["x"], expected)
    np.testing.assert_array_equal(nested.inputs["x"], expected)
    assert flat.inputs["x"].dtype == np.float32
    assert flat.rows == 2


@pytest.mark.parametrize("datatype", sorted(V2_TO_NUMPY))
def test_every_datatype_round_trips_in_json_and_binary(datatype: str) -> None:
    spec = TensorSpec("x", datatype, (-1, 3))
    array = _sample(datatype, (2, 3))
    data = [v.decode() for v in array.ravel()] if datatype == "BYTES" else array.ravel().tolist()
    decoded = codecs.decode_v2(_json_request(datatype=datatype, data=data), None, {"x": spec}, LIMITS)
    body, length = _binary_request({"x": array}, {"x": datatype})
    decoded_binary = codecs.decode_v2(body, length, {"x": spec}, LIMITS)
    for got in (decoded.inputs["x"], decoded_binary.inputs["x"]):
        if datatype == "BYTES":
            assert [v if isinstance(v, bytes) else v.encode() for v in got.ravel()] == list(array.ravel())
        else:
            np.testing.assert_array_equal(got, array)
            assert got.dtype == array.dtype

    # Encode back: JSON data and binary data decode to the same values.
    request = codecs.InferenceRequest(id="r1", inputs={}, outputs=None, binary_output=False, rows=2)
    out_json, header = codecs.encode_v2(model="m", variant="v", request=request, names=["y"], results=[array],
                                        specs={"y": spec})
    assert header is None
    parsed = orjson.loads(out_json)
    assert parsed["id"] == "r1" and parsed["model_version"] == "v"
    assert parsed["outputs"][0]["shape"] == [2, 3] and parsed["outputs"][0]["datatype"] == datatype
    if datatype == "BYTES":
        assert parsed["outputs"][0]["data"] == [v.decode() for v in array.ravel()]
    else:
        np.testing.assert_allclose(np.array(parsed["outputs"][0]["data"], dtype=np.float64),
                                   array.ravel().astype(np.float64), rtol=1e-3 if datatype == "FP16" else 1e-7)
    request.binary_output = True
    out_bin, header = codecs.encode_v2(model="m", variant="v", request=request, names=["y"], results=[array],
                                       specs={"y": spec})
    assert header is not None
    meta = orjson.loads(out_bin[:header])["outputs"][0]
    raw = out_bin[header:]
    assert meta["parameters"]["binary_data_size"] == len(raw)
    assert raw == _raw(array, datatype)


def test_outputs_can_be_selected_and_mixed_binary_and_json() -> None:
    header = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}],
              "outputs": [{"name": "b", "parameters": {"binary_data": True}}, {"name": "a"}]}
    request = codecs.decode_v2(orjson.dumps(header), None, {"x": SPEC}, LIMITS)
    a, b = np.ones((1, 2), np.float32), np.full((1, 2), 2, np.float32)
    specs = {"a": TensorSpec("a", "FP32", (-1, 2)), "b": TensorSpec("b", "FP32", (-1, 2))}
    body, length = codecs.encode_v2(model="m", variant="v", request=request, names=["a", "b"], results=[a, b],
                                    specs=specs)
    assert length is not None
    outputs = orjson.loads(body[:length])["outputs"]
    assert [o["name"] for o in outputs] == ["b", "a"]
    assert outputs[1]["data"] == [1.0, 1.0]
    assert np.frombuffer(body[length:], np.float32).tolist() == [2.0, 2.0]


@pytest.mark.parametrize(
    ("body", "header", "message"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[]", None, "JSON object"),
        (orjson.dumps({"inputs": []}), None, "non-empty list"),
        (_json_request(name="y"), None, "unknown input 'y'"),
        (_json_request(datatype="FP64"), None, "expects FP32"),
        (_json_request(shape=[2, 3, 1]), None, "rank 3"),
        (_json_request(shape=[3, 2]), None, "axis 1"),
        (_json_request(data=[1, 2, 3]), None, "3 values"),
        (_json_request(data=[1, "a", 3, 4, 5, 6]), None, "numbers only"),
        (_json_request(data=["1", "2", "3", "4", "5", "6"]), None, "numbers only"),
        (_json_request(data=[[1, 2], [3]]), None, "regular"),
        (_json_request(shape=[2, -3]), None, "non-negative"),
        (orjson.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32"}]}), None, "neither"),
        (_json_request(), "abc", "not an integer"),
        (_json_request(), "99999", "does not fit"),
    ],
)
def test_malformed_requests_name_what_is_wrong(body: bytes, header: str | None, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        codecs.decode_v2(body, header, {"x": SPEC}, LIMITS)


def test_missing_and_duplicate_inputs() -> None:
    specs = {"x": SPEC, "z": TensorSpec("z", "INT64", (-1,))}
    with pytest.raises(InvalidInput, match="missing input"):
        codecs.decode_v2(_json_request(), None, specs, LIMITS)
    twice = orjson.dumps({"inputs": [orjson.loads(_json_request())["inputs"][0]] * 2})
    with pytest.raises(InvalidInput, match="twice"):
        codecs.decode_v2(twice, None, {"x": SPEC}, LIMITS)


def test_integer_inputs_refuse_fractions_and_overflow() -> None:
    spec = TensorSpec("x", "UINT8", (-1, 3))
    with pytest.raises(InvalidInput, match="integers only"):
        codecs.decode_v2(_json_request(datatype="UINT8", data=[1.5, 2, 3, 4, 5, 6]), None, {"x": spec}, LIMITS)
    with pytest.raises(InvalidInput, match="does not fit"):
        codecs.decode_v2(_json_request(datatype="UINT8", data=[300, 2, 3, 4, 5, 6]), None, {"x": spec}, LIMITS)


def test_binary_sizes_must_match_exactly() -> None:
    array = np.ones((2, 3), np.float32)
    body, length = _binary_request({"x": array}, {"x": "FP32"})
    with pytest.raises(InvalidInput, match="belong to no input"):
        codecs.decode_v2(body + b"\0\0\0\0", length, {"x": SPEC}, LIMITS)
    with pytest.raises(InvalidInput, match="binary_data_size"):
        codecs.decode_v2(body[:-4], length, {"x": SPEC}, LIMITS)
    wrong = orjson.dumps({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32",
                                      "parameters": {"binary_data_size": 8}}]})
    with pytest.raises(InvalidInput, match="needs 24"):
        codecs.decode_v2(wrong + b"\0" * 8, str(len(wrong)), {"x": SPEC}, LIMITS)


def test_truncated_bytes_elements_are_refused() -> None:
    spec = TensorSpec("x", "BYTES", (-1,))
    header = orjson.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": 6}}]})
    with pytest.raises(InvalidInput, match="runs past"):
        codecs.decode_v2(header + struct.pack("<I", 10) + b"ab", str(len(header)), {"x": spec}, LIMITS)


def test_batch_and_element_limits() -> None:
    with pytest.raises(TooLarge, match="batch of 65"):
        codecs.decode_v2(_json_request(shape=[65, 3], data=[0] * 195), None, {"x": SPEC}, LIMITS)
    big = TensorSpec("x", "FP32", (100, 101))
    with pytest.raises(TooLarge, match="10100 elements"):
        codecs.decode_v2(_json_request(shape=[100, 101], data=[0]), None, {"x": big}, LIMITS)


def test_plain_predict_accepts_named_or_bare_inputs() -> None:
    named = codecs.decode_predict({"inputs": {"x": [[1, 2, 3]]}}, {"x": SPEC}, LIMITS)
    bare = codecs.decode_predict({"inputs": [[1, 2, 3]]}, {"x": SPEC}, LIMITS)
    np.testing.assert_array_equal(named["x"], bare["x"])
    with pytest.raises(InvalidInput, match="axis 1"):
        codecs.decode_predict({"inputs": {"x": [[1, 2]]}}, {"x": SPEC}, LIMITS)
    with pytest.raises(InvalidInput, match="numbers only"):
        codecs.decode_predict({"inputs": {"x": [["a", "b", "c"]]}}, {"x": SPEC}, LIMITS)


def test_scalar_and_string_outputs_of_plain_predict() -> None:
    nested = codecs.encode_outputs_nested(
        ["s", "t", "h"], [np.array(4.5, np.float32), np.array([b"a", "b"], dtype=object), np.ones(2, np.float16)])
    assert orjson.loads(orjson.dumps(nested, option=orjson.OPT_SERIALIZE_NUMPY)) == {
        "s": 4.5, "t": ["a", "b"], "h": [1.0, 1.0]}


def test_large_unsigned_values_keep_every_bit() -> None:
    spec = TensorSpec("x", "UINT64", (-1,))
    body = orjson.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "UINT64", "data": [2**63 + 1, 0]}]})
    decoded = codecs.decode_v2(body, None, {"x": spec}, LIMITS).inputs["x"]
    assert decoded.dtype == np.uint64 and decoded.tolist() == [2**63 + 1, 0]
    fraction = orjson.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "UINT64", "data": [2**63, 0.5]}]})
    with pytest.raises(InvalidInput, match="integers only"):
        codecs.decode_v2(fraction, None, {"x": spec}, LIMITS)
