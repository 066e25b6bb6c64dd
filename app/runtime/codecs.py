"""Open Inference Protocol (V2) and plain-JSON tensor codecs: bytes <-> numpy, with every check a client needs."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from app.errors import InvalidInput, TooLarge
from app.runtime.datatypes import ELEMENT_SIZE, V2_TO_NUMPY, TensorSpec, v2_datatype_of

_NUMERIC_KINDS = frozenset("biuf")
_INTEGER_KINDS = frozenset("biu")


@dataclass(frozen=True, slots=True)
class Limits:
    max_batch_size: int
    max_tensor_elements: int


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(slots=True)
class InferenceRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None
    binary_output: bool
    rows: int


def parse_json(data: bytes | memoryview, what: str = "request body") -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None


def decode_v2(
    body: bytes, header_length: str | None, specs: dict[str, TensorSpec], limits: Limits
) -> InferenceRequest:
    binary = b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidInput(f"Inference-Header-Content-Length '{header_length}' is not an integer") from None
        if length <= 0 or length > len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length {length} does not fit the body of {len(body)} bytes"
            )
        header = parse_json(memoryview(body)[:length], "inference header")
        binary = body[length:]
    else:
        header = parse_json(body)
    if not isinstance(header, dict):
        raise InvalidInput("request body must be a JSON object with 'inputs'")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")

    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for item in raw_inputs:
        if not isinstance(item, dict):
            raise InvalidInput("each entry of 'inputs' must be an object with name, shape, datatype and data")
        name = item.get("name")
        if not isinstance(name, str) or name not in specs:
            raise InvalidInput(unknown_input(name, specs))
        spec = specs[name]
        if name in inputs:
            raise InvalidInput(f"input '{name}' is given twice")
        shape = _shape(item.get("shape"), name)
        datatype = item.get("datatype")
        if datatype != spec.datatype:
            raise InvalidInput(f"input '{name}' has datatype {datatype!r}, but the model expects {spec.datatype}")
        check_shape(shape, spec, limits)
        params = item.get("parameters")
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput(
                    f"input '{name}' declares binary_data_size {size!r}, but only "
                    f"{len(binary) - offset} bytes of binary data follow the header"
                )
            array = from_binary(binary[offset:offset + size], shape, spec)
            offset += size
        else:
            if "data" not in item:
                raise InvalidInput(f"input '{name}' has neither 'data' nor a binary_data_size parameter")
            array = _from_json_data(item["data"], shape, spec)
        inputs[name] = array
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data after the header belong to no input")
    missing = [n for n in specs if n not in inputs]
    if missing:
        raise InvalidInput(f"missing input(s): {', '.join(repr(m) for m in missing)}")

    params = header.get("parameters")
    binary_default = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    request_id = header.get("id")
    return InferenceRequest(
        id=str(request_id) if request_id is not None else None,
        inputs=inputs,
        outputs=_requested_outputs(header.get("outputs"), binary_default),
        binary_output=binary_default,
        rows=count_rows(inputs, specs),
    )


def decode_predict(payload: Any, specs: dict[str, TensorSpec], limits: Limits) -> dict[str, np.ndarray]:
    """Plain JSON: `{"inputs": {name: nested list}}`; a bare list is accepted for single-input models."""
    raw = payload.get("inputs") if isinstance(payload, dict) else None
    if isinstance(raw, list) and len(specs) == 1:
        raw = {next(iter(specs)): raw}
    if not isinstance(raw, dict) or not raw:
        raise InvalidInput("'inputs' must be an object mapping each input name to a (nested) list")
    inputs: dict[str, np.ndarray] = {}
    for name, data in raw.items():
        spec = specs.get(name)
        if spec is None:
            raise InvalidInput(unknown_input(name, specs))
        array = _to_array(data, spec)
        check_shape(array.shape, spec, limits)
        inputs[name] = array
    missing = [n for n in specs if n not in inputs]
    if missing:
        raise InvalidInput(f"missing input(s): {', '.join(repr(m) for m in missing)}")
    return inputs


def encode_v2(
    *, model: str, variant: str, request: InferenceRequest, names: list[str], results: list[np.ndarray],
    specs: dict[str, TensorSpec], parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Returns the body and, when any output is binary, the JSON header length for the response header."""
    selected: list[tuple[str, np.ndarray, bool]]
    if request.outputs is None:
        selected = [(n, r, request.binary_output) for n, r in zip(names, results, strict=True)]
    else:
        by_name = dict(zip(names, results, strict=True))
        selected = [(o.name, by_name[o.name], o.binary) for o in request.outputs]
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array, binary in selected:
        spec = specs.get(name)
        datatype = spec.datatype if spec is not None else v2_datatype_of(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = to_binary(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_data(array, datatype)
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": model, "model_version": variant, "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    if parameters:
        response["parameters"] = parameters
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def encode_outputs_nested(names: list[str], results: list[np.ndarray]) -> dict[str, Any]:
    return {n: _nested(r) for n, r in zip(names, results, strict=True)}


def _nested(array: np.ndarray) -> Any:
    if array.ndim == 0:
        return _decode(array.item()) if array.dtype.kind in ("O", "S", "U") else array.item()  # orjson: no 0-d
    if array.dtype == np.float16:
        return array.astype(np.float32)
    return _bytes_to_str(array)


def _bytes_to_str(array: np.ndarray) -> Any:
    if array.dtype.kind in ("O", "S", "U"):
        return [_decode(v) for v in array.ravel()] if array.ndim else _decode(array.item())
    return array


def _decode(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _requested_outputs(raw: Any, binary_default: bool) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidInput("'outputs' must be a list of {name, parameters}")
    requested = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput("each entry of 'outputs' must be an object with a 'name'")
        params = item.get("parameters")
        binary = params.get("binary_data", binary_default) if isinstance(params, dict) else binary_default
        requested.append(RequestedOutput(name=item["name"], binary=bool(binary)))
    return requested


def check_requested_outputs(request: InferenceRequest, outputs: dict[str, TensorSpec]) -> None:
    for requested in request.outputs or ():
        if requested.name not in outputs:
            raise InvalidInput(
                f"unknown output '{requested.name}'; the model's outputs are: {', '.join(outputs)}"
            )


def unknown_input(name: Any, specs: dict[str, TensorSpec]) -> str:
    if not isinstance(name, str):
        return "every input needs a string 'name'"
    return f"unknown input '{name}'; the model's inputs are: {', '.join(specs)}"


def _shape(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(type(d) is int and d >= 0 for d in raw):
        raise InvalidInput(f"input '{name}': 'shape' must be a list of non-negative integers")
    return tuple(raw)


def check_shape(shape: tuple[int, ...], spec: TensorSpec, limits: Limits) -> None:
    if len(shape) != len(spec.shape):
        raise InvalidInput(
            f"input '{spec.name}' has rank {len(shape)} (shape {list(shape)}), "
            f"but the model expects rank {len(spec.shape)} (shape {list(spec.shape)})"
        )
    for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if want >= 0 and got != want:
            raise InvalidInput(
                f"input '{spec.name}' has size {got} on axis {axis}, but the model expects {want} "
                f"(shape {list(spec.shape)})"
            )
    if spec.has_dynamic_batch and shape[0] > limits.max_batch_size:
        raise TooLarge(
            f"input '{spec.name}' has a batch of {shape[0]} rows; the limit is {limits.max_batch_size}"
        )
    elements = math.prod(shape)
    if elements > limits.max_tensor_elements:
        raise TooLarge(
            f"input '{spec.name}' has {elements} elements; the limit is {limits.max_tensor_elements}"
        )


def _from_json_data(data: Any, shape: tuple[int, ...], spec: TensorSpec) -> np.ndarray:
    array = _to_array(data, spec)
    expected = math.prod(shape)
    if array.size != expected:
        raise InvalidInput(
            f"input '{spec.name}' has {array.size} values in 'data', but shape {list(shape)} needs {expected}"
        )
    return array.reshape(shape)


def _to_array(data: Any, spec: TensorSpec) -> np.ndarray:
    if spec.datatype == "BYTES":
        try:
            array = np.array(data, dtype=object)
        except ValueError:
            raise InvalidInput(f"input '{spec.name}': 'data' is not a regular (nested) list") from None
        if not all(isinstance(v, str | bytes) for v in array.flat):
            raise InvalidInput(f"input '{spec.name}' is BYTES: every value must be a string")
        return array
    try:
        # Converting without a dtype first lets strings show up as strings instead of being parsed.
        array = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidInput(f"input '{spec.name}': 'data' is not a regular (nested) list of numbers") from None
    if array.size == 0:
        return np.zeros(array.shape, dtype=spec.numpy_dtype)  # `[]` parses as float64, whatever the tensor is
    kind = array.dtype.kind
    if kind not in _NUMERIC_KINDS:
        raise InvalidInput(f"input '{spec.name}' is {spec.datatype}: 'data' must hold numbers only")
    if kind == "f" and spec.numpy_dtype.kind in _INTEGER_KINDS:
        # numpy turns [2**63, 0] into float64; only real fractions are refused.
        return _exact_integers(data, spec)
    target = spec.numpy_dtype
    if target.kind in "iu" and array.dtype != target and array.size:
        # astype wraps silently (300 -> 44 as UINT8): check the range first.
        limits = np.iinfo(target)
        if array.min() < limits.min or array.max() > limits.max:
            raise InvalidInput(f"input '{spec.name}': a value does not fit {spec.datatype}")
    return array.astype(target, copy=False)


def _exact_integers(data: Any, spec: TensorSpec) -> np.ndarray:
    values = np.asarray(data, dtype=object)
    if not all(type(v) is int for v in values.flat):
        raise InvalidInput(f"input '{spec.name}' is {spec.datatype}: 'data' must hold integers only")
    limits = np.iinfo(spec.numpy_dtype)
    if not all(limits.min <= v <= limits.max for v in values.flat):
        raise InvalidInput(f"input '{spec.name}': a value does not fit {spec.datatype}")
    return values.astype(spec.numpy_dtype)


def from_binary(raw: bytes, shape: tuple[int, ...], spec: TensorSpec) -> np.ndarray:
    expected = math.prod(shape)
    if spec.datatype == "BYTES":
        values = _unpack_bytes(raw, spec.name)
        if len(values) != expected:
            raise InvalidInput(
                f"input '{spec.name}' has {len(values)} strings, but shape {list(shape)} needs {expected}"
            )
        return np.array(values, dtype=object).reshape(shape)
    itemsize = ELEMENT_SIZE[spec.datatype]
    if len(raw) != expected * itemsize:
        raise InvalidInput(
            f"input '{spec.name}' has {len(raw)} bytes of binary data, but {spec.datatype} shape "
            f"{list(shape)} needs {expected * itemsize}"
        )
    return np.frombuffer(raw, dtype=V2_TO_NUMPY[spec.datatype].newbyteorder("<")).reshape(shape)


def _unpack_bytes(raw: bytes, name: str) -> list[bytes]:
    values: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"input '{name}': truncated BYTES element length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(f"input '{name}': a BYTES element runs past the end of its data")
        values.append(raw[offset:offset + length])
        offset += length
    return values


def to_binary(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts: list[bytes] = []
        for value in array.ravel():
            encoded = value if isinstance(value, bytes) else str(value).encode("utf-8")
            parts.append(struct.pack("<I", len(encoded)))
            parts.append(encoded)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _json_data(array: np.ndarray, datatype: str) -> Any:
    if datatype == "BYTES":
        return [_decode(v) for v in array.ravel()]
    flat = array.reshape(-1)
    if flat.dtype == np.float16:
        return flat.astype(np.float32)
    return np.ascontiguousarray(flat)


def as_strings(array: np.ndarray, name: str) -> np.ndarray:
    """A BYTES tensor as onnxruntime takes it: str elements (it would store bytes as their repr, "b'...'")."""
    if not any(isinstance(v, bytes) for v in array.flat):
        return array
    strings = np.empty(array.shape, dtype=object)
    for index, value in enumerate(array.flat):
        try:
            strings.flat[index] = value.decode("utf-8") if isinstance(value, bytes) else value
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"input '{name}': element {index} is not valid UTF-8 (byte {exc.start}); "
                               "onnxruntime string tensors hold text") from None
    return strings


def count_rows(inputs: dict[str, np.ndarray], specs: dict[str, TensorSpec]) -> int:
    for name, array in inputs.items():
        if specs[name].has_dynamic_batch:
            return int(array.shape[0])
    return 1
