"""Text generation over HTTP: OpenAI's completions and chat completions (with Server-Sent Events streaming),
and the Open Inference Protocol's generate extension as Triton serves it.

Every field a request may carry is listed: an unknown one is a 400 naming it, rather than a silently ignored
setting. Fields OpenAI's clients send that change nothing here (`user`, zero penalties) are accepted.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from app.api.body import read_body
from app.api.deps import ModelName, Reader, Services, VariantName
from app.api.openai import split_model
from app.errors import InvalidInput
from app.generation.engine import Finished, Piece
from app.generation.sampling import (
    DEFAULT_MAX_TOKENS,
    SAMPLING_FIELDS,
    SamplingParams,
    parse_sampling,
    refuse_unknown,
)
from app.runtime.codecs import parse_json
from app.services.generation import Prompt, Running
from app.services.inference import PROTOCOL_OPENAI, PROTOCOL_V2

router = APIRouter(tags=["generation"])

_SAMPLING = SAMPLING_FIELDS
_IGNORED = {"user", "stream_options"}
_COMPLETION_FIELDS = {"model", "prompt", "stream", "best_of", "echo", "logprobs", "presence_penalty",
                      "frequency_penalty", "suffix", "logit_bias"} | _SAMPLING | _IGNORED
_CHAT_FIELDS = {"model", "messages", "stream", "max_completion_tokens", "logprobs", "top_logprobs",
                "presence_penalty", "frequency_penalty", "logit_bias", "response_format", "tools", "tool_choice",
                "parallel_tool_calls", "store", "metadata"} | _SAMPLING | _IGNORED
_GENERATE_FIELDS = {"id", "text_input", "parameters", "stream"} | _SAMPLING
_GENERATE_PARAMETERS = _SAMPLING | {"stream"}
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _body(request: Request, services: Services, fields: set[str]) -> dict[str, Any]:
    raw = parse_json(await read_body(request, services.settings.max_request_bytes))
    if not isinstance(raw, dict):
        raise InvalidInput("the body must be a JSON object")
    refuse_unknown(raw, fields, "field")
    for name in ("presence_penalty", "frequency_penalty"):
        if raw.get(name) not in (None, 0, 0.0):
            raise InvalidInput(f"'{name}' is not supported (only 0)")
    if raw.get("logit_bias"):
        raise InvalidInput("'logit_bias' is not supported")
    if raw.get("tools"):
        raise InvalidInput("'tools' (function calling) is not supported")
    if raw.get("top_logprobs") is not None:
        raise InvalidInput("'top_logprobs' is not supported")
    response_format = raw.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict)
                                        or response_format.get("type") != "text"):
        raise InvalidInput("'response_format' must be {\"type\": \"text\"}: structured output is not supported")
    if raw.get("suffix") is not None:
        raise InvalidInput("'suffix' (insertion) is not supported")
    stream = raw.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidInput("'stream' must be true or false")
    return raw


def _model_reference(raw: dict[str, Any]) -> tuple[str, str | None]:
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidInput("'model' must name a model: 'name' or 'name:variant'")
    return split_model(model)


def _usage(event: Finished) -> dict[str, int]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def _sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _include_usage(raw: dict[str, Any]) -> bool:
    options = raw.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


@router.post("/v1/completions")
async def completions(request: Request, _key: Reader) -> Response:
    """OpenAI's text completions: continue `prompt`; `stream: true` answers Server-Sent Events."""
    services: Services = request.app.state.services
    raw = await _body(request, services, _COMPLETION_FIELDS)
    name, variant = _model_reference(raw)
    prompt = raw.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidInput("'prompt' must be a string (or a list of one string)")
    params = parse_sampling(raw, default_max_tokens=DEFAULT_MAX_TOKENS)
    running = await services.generation.start(name=name, variant=variant, prompt=Prompt(text=prompt), params=params,
                                              protocol=PROTOCOL_OPENAI, request_id=request.headers.get("x-request-id"))
    identifier, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    headers = {"X-Variant": running.variant}

    def choice(text: str, reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}

    def envelope(choices: list[Any]) -> dict[str, Any]:
        return {"id": identifier, "object": "text_completion", "created": created, "model": raw["model"],
                "choices": choices}

    if raw.get("stream"):
        async def chunks() -> AsyncIterator[bytes]:
            async for event in running.events():
                if isinstance(event, Piece):
                    yield _sse(envelope([choice(event.text, None)]))
                else:
                    yield _sse(envelope([choice("", event.reason)]))
                    if _include_usage(raw):
                        yield _sse({**envelope([]), "usage": _usage(event)})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream", headers={**headers, **_SSE_HEADERS})
    done = await running.collect(request.is_disconnected)
    answer = {**envelope([choice(done.text, done.reason)]), "usage": _usage(done)}
    return Response(orjson.dumps(answer), media_type="application/json", headers=headers)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, _key: Reader) -> Response:
    """OpenAI's chat completions: `messages` rendered with the model's own chat template (sandboxed)."""
    services: Services = request.app.state.services
    raw = await _body(request, services, _CHAT_FIELDS)
    name, variant = _model_reference(raw)
    if raw.get("tool_choice") not in (None, "none"):
        raise InvalidInput("'tool_choice' must be 'none' or absent: function calling is not supported")
    params = parse_sampling(raw, default_max_tokens=None)
    running = await services.generation.start(
        name=name, variant=variant, prompt=Prompt(messages=raw.get("messages")), params=params,
        protocol=PROTOCOL_OPENAI, request_id=request.headers.get("x-request-id"))
    identifier, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    headers = {"X-Variant": running.variant}

    def envelope(kind: str, choices: list[Any]) -> dict[str, Any]:
        return {"id": identifier, "object": kind, "created": created, "model": raw["model"], "choices": choices}

    if raw.get("stream"):
        async def chunks() -> AsyncIterator[bytes]:
            kind = "chat.completion.chunk"
            yield _sse(envelope(kind, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None, "logprobs": None}]))
            async for event in running.events():
                if isinstance(event, Piece):
                    yield _sse(envelope(kind, [{"index": 0, "delta": {"content": event.text}, "finish_reason": None,
                                                "logprobs": None}]))
                else:
                    yield _sse(envelope(kind, [{"index": 0, "delta": {}, "finish_reason": event.reason,
                                                "logprobs": None}]))
                    if _include_usage(raw):
                        yield _sse({**envelope(kind, []), "usage": _usage(event)})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream", headers={**headers, **_SSE_HEADERS})
    done = await running.collect(request.is_disconnected)
    message = {"role": "assistant", "content": done.text}
    answer = {**envelope("chat.completion", [{"index": 0, "message": message, "finish_reason": done.reason,
                                              "logprobs": None}]), "usage": _usage(done)}
    return Response(orjson.dumps(answer), media_type="application/json", headers=headers)


async def _generate(request: Request, name: str, variant: str | None, stream: bool) -> Response:
    """Triton's generate extension: `text_input` and sampling settings (top level or in `parameters`)."""
    services: Services = request.app.state.services
    raw = await _body(request, services, _GENERATE_FIELDS)
    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    refuse_unknown(parameters, _GENERATE_PARAMETERS, "parameter")
    text = raw.get("text_input")
    if not isinstance(text, str):
        raise InvalidInput("'text_input' must be a string")
    settings = {**{k: v for k, v in raw.items() if k in _SAMPLING}, **parameters}
    params: SamplingParams = parse_sampling(settings, default_max_tokens=DEFAULT_MAX_TOKENS)
    request_id = raw.get("id") if isinstance(raw.get("id"), str) else request.headers.get("x-request-id")
    running: Running = await services.generation.start(name=name, variant=variant, prompt=Prompt(text=text),
                                                       params=params, protocol=PROTOCOL_V2, request_id=request_id)
    base: dict[str, Any] = {"model_name": name, "model_version": running.variant}
    if isinstance(raw.get("id"), str):
        base["id"] = raw["id"]
    headers = {"X-Variant": running.variant}
    if stream or parameters.get("stream") is True:
        async def events() -> AsyncIterator[bytes]:
            async for event in running.events():
                if isinstance(event, Piece):
                    yield _sse({**base, "text_output": event.text})
                else:
                    yield _sse({**base, "text_output": "", "finish_reason": event.reason, **_usage(event)})

        return StreamingResponse(events(), media_type="text/event-stream", headers={**headers, **_SSE_HEADERS})
    done = await running.collect(request.is_disconnected)
    answer = {**base, "text_output": done.text, "finish_reason": done.reason, **_usage(done)}
    return Response(orjson.dumps(answer), media_type="application/json", headers=headers)


@router.post("/v2/models/{name}/generate")
async def generate(name: ModelName, request: Request, _key: Reader) -> Response:
    """Generate text (routing decides the variant); the whole answer at once."""
    return await _generate(request, name, None, stream=False)


@router.post("/v2/models/{name}/versions/{variant}/generate")
async def generate_version(name: ModelName, variant: VariantName, request: Request, _key: Reader) -> Response:
    """Generate text with one variant."""
    return await _generate(request, name, variant, stream=False)


@router.post("/v2/models/{name}/generate_stream")
async def generate_stream(name: ModelName, request: Request, _key: Reader) -> Response:
    """Generate text as Server-Sent Events, one JSON object per piece."""
    return await _generate(request, name, None, stream=True)


@router.post("/v2/models/{name}/versions/{variant}/generate_stream")
async def generate_stream_version(name: ModelName, variant: VariantName, request: Request, _key: Reader) -> Response:
    """Generate text with one variant, as Server-Sent Events."""
    return await _generate(request, name, variant, stream=True)
