"""Plain JSON predictions: nested lists in, nested lists out."""

from __future__ import annotations

from time import perf_counter

from fastapi import APIRouter, Request, Response

from app.api.body import read_body
from app.api.deps import ModelName, Services
from app.api.predictions import plain_predict

router = APIRouter(tags=["predictions"])


@router.post("/models/{name}/predict", openapi_extra={
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "object", "required": ["inputs"], "properties": {
            "inputs": {"type": "object",
                       "description": "input name -> nested list (a bare list for single-input models)",
                       "example": {"input": [[0.0] * 64]}},
            "variant": {"type": "string", "description": "serve this variant, whatever the routing says",
                        "example": "int8-dynamic"}}},
        "example": {"inputs": {"input": [[0.0] * 64]}}}}},
    "responses": {"200": {"description": "Outputs as nested lists", "content": {"application/json": {"example": {
        "model": "digits", "variant": "original", "outputs": {"logits": [[0.1] * 10]}, "latency_ms": 0.4}}}}},
})
async def predict(request: Request, name: ModelName) -> Response:
    """Predict with plain JSON; `variant` picks a variant, otherwise routing decides."""
    started = perf_counter()
    services: Services = request.app.state.services
    body = await read_body(request, services.settings.max_request_bytes)
    payload, media_type, headers = await plain_predict(services, request.headers, name, body, started)
    return Response(payload, media_type=media_type, headers=headers)
