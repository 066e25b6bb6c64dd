"""Property-based tests of the V2 codecs: any tensor round-trips; garbage is refused, never crashes."""

from __future__ import annotations

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from app.errors import SlimServeError
from app.runtime import codecs
from app.runtime.datatypes import V2_TO_NUMPY, TensorSpec

LIMITS = codecs.Limits(max_batch_size=1 << 16, max_tensor_elements=1 << 20)
NUMERIC = sorted(name for name in V2_TO_NUMPY if name != "BYTES")


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, np.ndarray]:
    datatype = draw(st.sampled_from(NUMERIC))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    elements = hnp.from_dtype(V2_TO_NUMPY[datatype], allow_nan=False, allow_infinity=False) \
        if V2_TO_NUMPY[datatype].kind == "f" else None
    array = draw(hnp.arrays(V2_TO_NUMPY[datatype], shape, elements=elements))
    return datatype, array


def _spec(datatype: str, array: np.ndarray) -> dict[str, TensorSpec]:
    return {"x": TensorSpec("x", datatype, tuple(-1 for _ in array.shape))}


@settings(max_examples=150, deadline=None)
@given(tensors())
def test_binary_round_trip(case: tuple[str, np.ndarray]) -> None:
    datatype, array = case
    header = orjson.dumps({"inputs": [{"name": "x", "shape": list(array.shape), "datatype": datatype,
                                       "parameters": {"binary_data_size": array.nbytes}}]})
    request = codecs.decode_v2(header + array.tobytes(), str(len(header)), _spec(datatype, array), LIMITS)
    np.testing.assert_array_equal(request.inputs["x"], array)
    request.binary_output = True
    body, length = codecs.encode_v2(model="m", variant="v", request=request, names=["x"], results=[array],
                                    specs=_spec(datatype, array))
    assert length is not None
    decoded = np.frombuffer(body[length:], dtype=array.dtype).reshape(array.shape)
    np.testing.assert_array_equal(decoded, array)


@settings(max_examples=150, deadline=None)
@given(tensors())
def test_json_round_trip(case: tuple[str, np.ndarray]) -> None:
    datatype, array = case
    body = orjson.dumps({"inputs": [{"name": "x", "shape": list(array.shape), "datatype": datatype,
                                     "data": array.ravel().tolist()}]})
    request = codecs.decode_v2(body, None, _spec(datatype, array), LIMITS)
    if datatype == "FP16":
        np.testing.assert_allclose(request.inputs["x"].astype(np.float32), array.astype(np.float32), rtol=1e-3)
    else:
        np.testing.assert_array_equal(request.inputs["x"], array)
    out, _ = codecs.encode_v2(model="m", variant="v", request=request, names=["x"], results=[array],
                              specs=_spec(datatype, array))
    data = orjson.loads(out)["outputs"][0]["data"]
    # Parsed back into the tensor's own type, every value is exactly what was sent (shortest repr round-trips).
    np.testing.assert_array_equal(np.array(data, dtype=array.dtype).reshape(array.shape), array)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256), st.one_of(st.none(), st.text(max_size=8)))
def test_garbage_is_refused_with_a_client_error(body: bytes, header: str | None) -> None:
    spec = {"x": TensorSpec("x", "FP32", (-1, 3))}
    try:
        codecs.decode_v2(body, header, spec, LIMITS)
    except SlimServeError as exc:
        assert 400 <= exc.status_code < 500


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children,
                                                                                       max_size=4), max_leaves=20))
def test_any_json_document_is_refused_or_accepted_never_crashes(document: object) -> None:
    spec = {"x": TensorSpec("x", "INT32", (-1,))}
    for payload in (document, {"inputs": [document]}, {"inputs": [{"name": "x", "shape": [1], "datatype": "INT32",
                                                                   "data": document}]}):
        try:
            body = orjson.dumps(payload)
        except (orjson.JSONEncodeError, TypeError):
            continue
        try:
            codecs.decode_v2(body, None, spec, LIMITS)
        except SlimServeError as exc:
            assert 400 <= exc.status_code < 500


@settings(max_examples=100, deadline=None)
@given(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4), st.data())
def test_bytes_round_trip(shape: tuple[int, ...], data: st.DataObject) -> None:
    count = int(np.prod(shape))
    values = data.draw(st.lists(st.text(max_size=12), min_size=count, max_size=count))
    array = np.array(values, dtype=object).reshape(shape)
    spec = {"x": TensorSpec("x", "BYTES", tuple(-1 for _ in shape))}
    encoded = [v.encode() for v in values]
    blob = b"".join(len(v).to_bytes(4, "little") + v for v in encoded)
    header = orjson.dumps({"inputs": [{"name": "x", "shape": list(shape), "datatype": "BYTES",
                                       "parameters": {"binary_data_size": len(blob)}}]})
    binary = codecs.decode_v2(header + blob, str(len(header)), spec, LIMITS).inputs["x"]
    assert list(binary.ravel()) == encoded
    body = orjson.dumps({"inputs": [{"name": "x", "shape": list(shape), "datatype": "BYTES", "data": values}]})
    request = codecs.decode_v2(body, None, spec, LIMITS)
    assert list(request.inputs["x"].ravel()) == values
    out, _ = codecs.encode_v2(model="m", variant="v", request=request, names=["x"], results=[array], specs=spec)
    assert orjson.loads(out)["outputs"][0]["data"] == values
