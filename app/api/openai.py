"""OpenAI-compatible routes: `POST /v1/embeddings`, `GET /v1/models`, so OpenAI's clients work unchanged."""

from __future__ import annotations

import asyncio
import base64
from time import perf_counter
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.api.body import read_body
from app.api.deps import Reader, Services, ServicesDep
from app.errors import InvalidInput, NotFound
from app.runtime.codecs import parse_json

router = APIRouter(tags=["openai"])


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `user` and future fields the clients send are accepted

    model: str = Field(description="'name' (routing decides the variant) or 'name:variant'",
                       examples=["minilm"])
    input: str | list[str] = Field(description="One text or a list of texts", examples=[["hello world"]])
    encoding_format: str = Field(default="float", description="'float' or 'base64' (little-endian float32)",
                                 examples=["float"])
    dimensions: int | None = Field(default=None, description="Must equal the model's dimensions when given",
                                   examples=[None])


def split_model(reference: str) -> tuple[str, str | None]:
    """'name' or 'name:variant'."""
    name, _, variant = reference.partition(":")
    return name, variant or None


_EMBEDDINGS_DOC = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["model", "input"], "properties": {
            "model": {"type": "string", "description": "'name' (routing decides the variant) or 'name:variant'",
                      "example": "minilm"},
            "input": {"description": "One text or a list of texts", "example": ["hello world"]},
            "encoding_format": {"type": "string", "enum": ["float", "base64"], "example": "float",
                                "description": "'float' lists, or 'base64' of little-endian float32"},
            "dimensions": {"type": "integer", "example": 384,
                           "description": "Optional; must equal the model's dimensions"}}}}}},
    "responses": {"200": {"description": "OpenAI's embedding list", "content": {"application/json": {"example": {
        "object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.01, -0.2]}],
        "model": "minilm", "usage": {"prompt_tokens": 4, "total_tokens": 4}}}}}},
}


@router.post("/v1/embeddings", openapi_extra=_EMBEDDINGS_DOC)
async def embeddings(request: Request, _key: Reader) -> Response:
    """Embeddings of one text or a list, from a text embeddings model, in OpenAI's shape."""
    started = perf_counter()
    services: Services = request.app.state.services
    raw = parse_json(await read_body(request, services.settings.max_request_bytes))
    if not isinstance(raw, dict):
        raise InvalidInput("the body must be a JSON object with 'model' and 'input'")
    body = _validated(raw)
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if body.encoding_format not in ("float", "base64"):
        raise InvalidInput(f"'encoding_format' must be 'float' or 'base64', not {body.encoding_format!r}")
    name, variant = split_model(body.model)
    chosen, vectors, tokens, prediction = await services.inference.embed(name=name, variant=variant, texts=texts,
                                                                          started=started)
    if body.dimensions is not None and body.dimensions != vectors.shape[1]:
        raise InvalidInput(f"'dimensions' is {body.dimensions}; model '{name}' gives {vectors.shape[1]}")
    data = [{"object": "embedding", "index": index,
             "embedding": _encode(vector, body.encoding_format)} for index, vector in enumerate(vectors)]
    answer = {"object": "list", "data": data, "model": body.model,
              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return Response(orjson.dumps(answer), media_type="application/json",
                    headers={"X-Variant": chosen, "Server-Timing": prediction.server_timing()})


def _validated(raw: dict[str, Any]) -> EmbeddingsRequest:
    try:
        return EmbeddingsRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidInput(f"'{where}': {first['msg']}") from None


def _encode(vector: np.ndarray, encoding: str) -> Any:
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode()
    return vector.astype(np.float32).tolist()


@router.get("/v1/models")
async def list_models(services: ServicesDep, _key: Reader) -> dict[str, Any]:
    """Every ready model, and each of its variants as 'name:variant', in OpenAI's list shape."""
    rows = await asyncio.to_thread(services.models.list_all)
    data = []
    for row in rows:
        if row.state != "ready":
            continue
        data.append(_model_object(row.name, row))
        data.extend(_model_object(f"{row.name}:{v.name}", row) for v in row.variants if v.name != "original")
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id}")
async def get_model(
    model_id: Annotated[str, Path(description="'name' or 'name:variant'",
                                  openapi_examples={"minilm": {"value": "minilm"}})],
    services: ServicesDep, _key: Reader,
) -> dict[str, Any]:
    """One model (or 'name:variant') in OpenAI's shape."""
    name, variant = split_model(model_id)
    row = await asyncio.to_thread(services.models.get, name)
    if variant is not None and variant not in {v.name for v in row.variants}:
        raise NotFound(f"model '{name}' has no variant '{variant}'")
    return _model_object(model_id, row)


def _model_object(model_id: str, row: Any) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(row.created_at.timestamp()), "owned_by": "slimserve",
            "task": ((row.config or {}).get("huggingface") or {}).get("task")
            or ((row.config or {}).get("text") or {}).get("task")}
