"""Open Inference Protocol gRPC messages <-> numpy, with the checks and messages of the REST codec."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from app.api.grpc_service import inference_pb2 as pb
from app.errors import InvalidInput
from app.runtime import codecs
from app.runtime.datatypes import V2_TO_NUMPY, TensorSpec, v2_datatype_of

# Which repeated field of InferTensorContents carries each datatype (FP16 has none: raw contents only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def decode_request(message: pb.ModelInferRequest, specs: dict[str, TensorSpec],
                   limits: codecs.Limits) -> codecs.InferenceRequest:
    if not message.inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs: "
                           "send one per input, in the order of 'inputs'")
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            raise InvalidInput(codecs.unknown_input(name or None, specs))
        if name in inputs:
            raise InvalidInput(f"input '{name}' is given twice")
        if tensor.datatype != spec.datatype:
            raise InvalidInput(f"input '{name}' has datatype {tensor.datatype!r}, but the model expects "
                               f"{spec.datatype}")
        if any(d < 0 for d in tensor.shape):
            raise InvalidInput(f"input '{name}': 'shape' must be a list of non-negative integers")
        shape = tuple(int(d) for d in tensor.shape)
        codecs.check_shape(shape, spec, limits)
        has_contents = tensor.HasField("contents")
        if raw:
            if has_contents:
                raise InvalidInput(f"input '{name}' has both 'contents' and raw_input_contents: send one")
            inputs[name] = codecs.from_binary(raw[index], shape, spec)
        elif has_contents:
            inputs[name] = _from_contents(tensor.contents, shape, spec)
        else:
            raise InvalidInput(f"input '{name}' has neither 'contents' nor raw_input_contents")
    missing = [n for n in specs if n not in inputs]
    if missing:
        raise InvalidInput(f"missing input(s): {', '.join(repr(m) for m in missing)}")
    outputs = [codecs.RequestedOutput(name=o.name, binary=True) for o in message.outputs] or None
    return codecs.InferenceRequest(id=message.id or None, inputs=inputs, outputs=outputs, binary_output=True,
                                   rows=codecs.count_rows(inputs, specs))


def _from_contents(contents: pb.InferTensorContents, shape: tuple[int, ...], spec: TensorSpec) -> np.ndarray:
    field = _CONTENTS_FIELD.get(spec.datatype)
    if field is None:
        raise InvalidInput(f"input '{spec.name}' is {spec.datatype}, which typed contents cannot carry: send it "
                           "in raw_input_contents")
    others = [f.name for f, _ in contents.ListFields() if f.name != field]
    if others:
        raise InvalidInput(f"input '{spec.name}' is {spec.datatype}: its values belong in contents.{field}, "
                           f"not {', '.join(others)}")
    values = getattr(contents, field)
    expected = math.prod(shape)
    if len(values) != expected:
        raise InvalidInput(f"input '{spec.name}' has {len(values)} values in contents.{field}, but shape "
                           f"{list(shape)} needs {expected}")
    if spec.datatype == "BYTES":
        return np.array(list(values), dtype=object).reshape(shape)
    target = V2_TO_NUMPY[spec.datatype]
    if field not in ("int_contents", "uint_contents"):
        return np.array(list(values), dtype=target).reshape(shape)  # the field's own type: nothing to narrow
    wide = np.array(list(values), dtype=np.int64)
    if wide.size and wide.dtype != target:
        # int_contents carries INT8 and INT16 too: a value out of the tensor's range is refused, never wrapped.
        bounds = np.iinfo(target)
        if wide.min() < bounds.min or wide.max() > bounds.max:
            raise InvalidInput(f"input '{spec.name}': a value does not fit {spec.datatype}")
    return wide.astype(target).reshape(shape)


def encode_response(*, model: str, variant: str, request: codecs.InferenceRequest, names: list[str],
                    arrays: list[np.ndarray], specs: dict[str, TensorSpec],
                    parameters: dict[str, Any] | None) -> pb.ModelInferResponse:
    """Every output as raw_output_contents (as Triton answers, whatever the request used)."""
    by_name = dict(zip(names, arrays, strict=True))
    selected = [o.name for o in request.outputs] if request.outputs is not None else names
    response = pb.ModelInferResponse(model_name=model, model_version=variant, id=request.id or "")
    for name in selected:
        array = by_name[name]
        spec = specs.get(name)
        datatype = spec.datatype if spec is not None else v2_datatype_of(array)
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(codecs.to_binary(array, datatype))
    for key, value in (parameters or {}).items():
        response.parameters[key].string_param = "; ".join(value) if isinstance(value, list) else str(value)
    return response
