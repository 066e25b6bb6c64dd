"""Generation over gRPC, as Triton's LLM backends (vLLM, TensorRT-LLM) take it, so that `tritonclient.grpc`
users need no other client: ModelInfer with a BYTES `text_input` answers a BYTES `text_output`; in
ModelStreamInfer, `stream` (a BOOL input or a request parameter) answers one response per piece of text and a
last, empty one with `triton_final_response` (Triton's decoupled models end a stream that way).

Sampling settings come as request parameters (`max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop`), or
as vLLM's backend sends them, a JSON `sampling_parameters` BYTES input; both are checked as REST checks them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from typing import Any

from app.api.grpc_service import inference_pb2 as pb
from app.errors import InvalidInput
from app.generation.engine import Finished, Piece
from app.generation.sampling import DEFAULT_MAX_TOKENS, SAMPLING_FIELDS, parse_sampling, refuse_unknown
from app.services.generation import GenerationService, Prompt, Running
from app.services.inference import PROTOCOL_GRPC

TEXT_INPUT, TEXT_OUTPUT = "text_input", "text_output"
_INPUTS = {TEXT_INPUT, "stream", "sampling_parameters", "exclude_input_in_output"}
_FINAL = "triton_final_response"


async def start(service: GenerationService, request: pb.ModelInferRequest) -> tuple[Running, bool]:
    """The generation the request asks for, started (checked whole first, as REST does); and whether to stream."""
    inputs = _inputs(request)
    unknown = sorted(set(inputs) - _INPUTS)
    if unknown:
        raise InvalidInput(f"a generation model takes {', '.join(sorted(_INPUTS))}; got {', '.join(unknown[:5])}",
                           code="unknown_input")
    if TEXT_INPUT not in inputs:
        raise InvalidInput(f"a generation model needs the BYTES input '{TEXT_INPUT}'")
    texts = inputs[TEXT_INPUT]
    if len(texts) != 1 or not isinstance(texts[0], bytes):
        raise InvalidInput(f"'{TEXT_INPUT}' must be one BYTES element (one prompt per request)")
    try:
        text = texts[0].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"'{TEXT_INPUT}' is not UTF-8") from None
    parameters = {key: _value(value) for key, value in request.parameters.items()}
    stream = bool(parameters.pop("stream", False)) or _flag(inputs.get("stream"))
    settings = {key: value for key, value in parameters.items() if key in SAMPLING_FIELDS}
    if "sampling_parameters" in inputs:
        settings.update(_sampling_json(inputs["sampling_parameters"]))
    if isinstance(settings.get("stop"), str) and settings["stop"].startswith("["):
        settings["stop"] = json.loads(settings["stop"])  # a list of stop strings sent as one string parameter
    params = parse_sampling(settings, default_max_tokens=DEFAULT_MAX_TOKENS)
    running = await service.start(name=request.model_name, variant=request.model_version or None,
                                  prompt=Prompt(text=text), params=params, protocol=PROTOCOL_GRPC,
                                  request_id=request.id or None)
    return running, stream


async def answer(running: Running, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    done = await running.collect()
    return _response(running, request, done.text, done)


async def stream(running: Running, request: pb.ModelInferRequest) -> AsyncIterator[pb.ModelInferResponse]:
    async for event in running.events():
        if isinstance(event, Piece):
            yield _response(running, request, event.text, None)
        else:
            yield _response(running, request, "", event)


def _response(running: Running, request: pb.ModelInferRequest, text: str,
              finished: Finished | None) -> pb.ModelInferResponse:
    encoded = text.encode("utf-8")
    parameters: dict[str, pb.InferParameter] = {}
    if finished is not None:
        parameters = {"finish_reason": pb.InferParameter(string_param=finished.reason),
                      "prompt_tokens": pb.InferParameter(int64_param=finished.prompt_tokens),
                      "completion_tokens": pb.InferParameter(int64_param=finished.completion_tokens),
                      _FINAL: pb.InferParameter(bool_param=True)}
    return pb.ModelInferResponse(
        model_name=request.model_name, model_version=running.variant, id=request.id,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name=TEXT_OUTPUT, datatype="BYTES", shape=[1])],
        raw_output_contents=[struct.pack("<I", len(encoded)) + encoded], parameters=parameters)


def _inputs(request: pb.ModelInferRequest) -> dict[str, list[Any]]:
    """Each input's elements: BYTES as bytes, BOOL as bool, from typed contents or raw (length-prefixed) bytes."""
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInput(f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} inputs")
    values: dict[str, list[Any]] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.datatype not in ("BYTES", "BOOL"):
            raise InvalidInput(f"input '{tensor.name}' of a generation model must be BYTES or BOOL, "
                               f"not {tensor.datatype}")
        if request.raw_input_contents:
            raw = request.raw_input_contents[index]
            values[tensor.name] = _raw_bytes(raw, tensor.name) if tensor.datatype == "BYTES" else \
                [bool(b) for b in raw]
        else:
            contents = tensor.contents
            values[tensor.name] = list(contents.bytes_contents) if tensor.datatype == "BYTES" else \
                list(contents.bool_contents)
    return values


def _raw_bytes(raw: bytes, name: str) -> list[bytes]:
    """Triton's BYTES wire format: each element a 4-byte little-endian length and that many bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"raw contents of '{name}' end inside an element's length")
        (size,) = struct.unpack_from("<I", raw, offset)
        if offset + 4 + size > len(raw):
            raise InvalidInput(f"raw contents of '{name}' are shorter than their element lengths say")
        elements.append(raw[offset + 4:offset + 4 + size])
        offset += 4 + size
    return elements


def _value(parameter: pb.InferParameter) -> Any:
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind is not None else None


def _flag(values: list[Any] | None) -> bool:
    return bool(values) and bool(values[0])  # type: ignore[index]


def _sampling_json(values: list[Any]) -> dict[str, Any]:
    try:
        settings = json.loads(values[0]) if values else {}
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("'sampling_parameters' must be a JSON object") from None
    if not isinstance(settings, dict):
        raise InvalidInput("'sampling_parameters' must be a JSON object")
    refuse_unknown(settings, SAMPLING_FIELDS, "sampling parameter")
    return settings
