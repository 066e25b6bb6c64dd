"""The gRPC codec: any tensor round-trips raw or as typed contents; garbage is refused, never crashes."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from app.api.grpc_service import codec
from app.api.grpc_service import inference_pb2 as pb
from app.errors import InvalidInput, SlimServeError
from app.runtime import codecs
from app.runtime.datatypes import V2_TO_NUMPY, TensorSpec

LIMITS = codecs.Limits(max_batch_size=1 << 16, max_tensor_elements=1 << 20)
NUMERIC = sorted(name for name in V2_TO_NUMPY if name != "BYTES")
TYPED = [name for name in NUMERIC if name != "FP16"]  # typed contents have no field for FP16


@st.composite
def tensors(draw: st.DrawFn, datatypes: list[str]) -> tuple[str, np.ndarray]:
    datatype = draw(st.sampled_from(datatypes))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    dtype = V2_TO_NUMPY[datatype]
    elements = hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False) if dtype.kind == "f" else None
    return datatype, draw(hnp.arrays(dtype, shape, elements=elements))


def _spec(datatype: str, array: np.ndarray) -> dict[str, TensorSpec]:
    return {"x": TensorSpec("x", datatype, tuple(-1 for _ in array.shape))}


def _request(datatype: str, array: np.ndarray, raw: bool) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m")
    tensor = message.inputs.add(name="x", datatype=datatype, shape=array.shape)
    if raw:
        message.raw_input_contents.append(codecs.to_binary(array, datatype))
    else:
        field = codec._CONTENTS_FIELD[datatype]
        values = array.ravel().tolist() if datatype != "BYTES" else list(array.ravel())
        getattr(tensor.contents, field).extend(values)
    return message


def _round_trip(datatype: str, array: np.ndarray, raw: bool) -> np.ndarray:
    wire = _request(datatype, array, raw).SerializeToString()
    request = codec.decode_request(pb.ModelInferRequest.FromString(wire), _spec(datatype, array), LIMITS)
    np.testing.assert_array_equal(request.inputs["x"], array)
    response = codec.encode_response(model="m", variant="v", request=request, names=["x"],
                                     arrays=[request.inputs["x"]], specs=_spec(datatype, array), parameters=None)
    answered = pb.ModelInferResponse.FromString(response.SerializeToString())
    assert list(answered.outputs[0].shape) == list(array.shape) and answered.outputs[0].datatype == datatype
    spec = TensorSpec("y", datatype, tuple(array.shape))
    return codecs.from_binary(answered.raw_output_contents[0], tuple(array.shape), spec)


@settings(max_examples=150, deadline=None)
@given(tensors(NUMERIC))
def test_raw_contents_round_trip(case: tuple[str, np.ndarray]) -> None:
    datatype, array = case
    np.testing.assert_array_equal(_round_trip(datatype, array, raw=True), array)


@settings(max_examples=150, deadline=None)
@given(tensors(TYPED))
def test_typed_contents_round_trip(case: tuple[str, np.ndarray]) -> None:
    datatype, array = case
    np.testing.assert_array_equal(_round_trip(datatype, array, raw=False), array)


@settings(max_examples=60, deadline=None)
@given(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4), st.data())
def test_bytes_round_trip_raw_and_typed(shape: tuple[int, ...], data: st.DataObject) -> None:
    values = data.draw(st.lists(st.binary(max_size=12), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    array = np.array(values, dtype=object).reshape(shape)
    for raw in (True, False):
        np.testing.assert_array_equal(_round_trip("BYTES", array, raw), array)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_messages_are_refused_with_a_client_error(wire: bytes) -> None:
    specs = {"x": TensorSpec("x", "FP32", (-1, 3))}
    try:
        message = pb.ModelInferRequest.FromString(wire)
    except DecodeError:
        return  # grpc answers INTERNAL "failed to deserialize" before our code runs
    try:
        codec.decode_request(message, specs, LIMITS)
    except SlimServeError as exc:
        assert 400 <= exc.status_code < 500


SPECS = {"x": TensorSpec("x", "FP32", (-1, 3)), "n": TensorSpec("n", "INT8", (-1,))}


def _two(**changes: object) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend([1, 2, 3])
    message.inputs.add(name="n", datatype="INT8", shape=[1]).contents.int_contents.append(5)
    return message


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda m: setattr(m.inputs[0], "datatype", "FP64"), "has datatype 'FP64', but the model expects FP32"),
    (lambda m: m.inputs[0].shape.__setitem__(1, 4), "has size 4 on axis 1, but the model expects 3"),
    (lambda m: m.inputs[0].contents.fp32_contents.append(4), "has 4 values in contents.fp32_contents, but shape"),
    (lambda m: m.inputs[1].contents.int_contents.__setitem__(0, 300), "a value does not fit INT8"),
    (lambda m: m.inputs[0].contents.int64_contents.append(1), "its values belong in contents.fp32_contents"),
    (lambda m: m.raw_input_contents.extend([b"\0" * 12, b"\0"]), "has both 'contents' and raw_input_contents"),
    (lambda m: m.raw_input_contents.append(b"\0" * 12), "raw_input_contents has 1 entries for 2 inputs"),
    (lambda m: m.inputs[1].ClearField("contents"), "input 'n' has neither 'contents' nor raw_input_contents"),
    (lambda m: m.inputs.pop(), "missing input(s): 'n'"),
    (lambda m: setattr(m.inputs[1], "name", "x"), "input 'x' is given twice"),
    (lambda m: setattr(m.inputs[1], "name", "z"), "unknown input 'z'; the model's inputs are: x, n"),
    (lambda m: m.ClearField("inputs"), "'inputs' must be a non-empty list"),
])
def test_bad_messages_name_what_is_wrong(mutate: object, message: str) -> None:
    request = _two()
    mutate(request)  # type: ignore[operator]
    with pytest.raises(InvalidInput) as refused:
        codec.decode_request(request, SPECS, LIMITS)
    assert message in str(refused.value)


def test_raw_contents_of_the_wrong_length_are_refused() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    request.raw_input_contents.append(b"\0" * 20)
    with pytest.raises(InvalidInput, match="has 20 bytes of binary data, but FP32 shape \\[2, 3\\] needs 24"):
        codec.decode_request(request, {"x": SPECS["x"]}, LIMITS)


def test_fp16_needs_raw_contents() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="h", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidInput, match="FP16, which typed contents cannot carry"):
        codec.decode_request(request, {"h": TensorSpec("h", "FP16", (-1,))}, LIMITS)
