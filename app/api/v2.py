"""Open Inference Protocol (KServe V2) REST: health, server and model metadata, inference."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from time import perf_counter
from typing import Any

from fastapi import APIRouter, Request, Response

from app.api.body import read_body
from app.api.deps import ModelName, Reader, Services, ServicesDep, VariantName
from app.api.predictions import v2_infer
from app.api.responses import OrjsonResponse

router = APIRouter(tags=["open inference protocol"])

_INFER_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "JSON inference request, or a JSON header followed by raw tensors (binary tensor "
                       "extension) when the Inference-Header-Content-Length header is set.",
        "content": {
            "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
                "id": {"type": "string", "description": "Echoed in the response", "example": "req-42"},
                "inputs": {"type": "array", "description": "One entry per model input", "example": [
                    {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}],
                    "items": {"type": "object", "properties": {
                        "name": {"type": "string", "description": "The model input", "example": "input"},
                        "shape": {"type": "array", "items": {"type": "integer"}, "description": "Its shape",
                                  "example": [1, 64]},
                        "datatype": {"type": "string", "description": "Open Inference Protocol datatype",
                                     "example": "FP32"},
                        "data": {"type": "array", "items": {}, "description": "The values, flat or nested, "
                                 "row-major (absent when sent as binary)", "example": [0.0, 0.5, 1.0]},
                        "parameters": {"type": "object", "description": "binary_data_size: its bytes follow the "
                                       "JSON header", "example": {"binary_data_size": 256}}}}},
                "outputs": {"type": "array", "items": {"type": "object"}, "description": "Which outputs, and "
                            "whether each comes back as binary (default: all, as JSON)",
                            "example": [{"name": "logits", "parameters": {"binary_data": True}}]},
                "parameters": {"type": "object", "description": "binary_data_output: every output as binary",
                               "example": {"binary_data_output": False}}},
            }, "example": {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {"200": {"description": "Outputs, JSON or JSON header + binary tensors",
                          "headers": {"Server-Timing": {"schema": {"type": "string"}},
                                      "X-Variant": {"schema": {"type": "string"}}}}},
}


def server_version() -> str:
    try:
        return version("slimserve")
    except PackageNotFoundError:
        return "0+unknown"


@router.get("/v2")
async def server_metadata() -> OrjsonResponse:
    """Server name, version and protocol extensions."""
    return OrjsonResponse({"name": "slimserve", "version": server_version(), "extensions": ["binary_tensor_data"]})


def _health_guard(request: Request) -> None:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is not None and not services.settings.public_health:
        services.auth.require(request.headers, "predict")


@router.get("/v2/health/live")
async def live(request: Request) -> OrjsonResponse:
    """The process is up."""
    _health_guard(request)
    return OrjsonResponse({"live": True})


@router.get("/v2/health/ready")
async def ready(request: Request) -> OrjsonResponse:
    """Start-up finished: models can be served."""
    _health_guard(request)
    is_ready = bool(getattr(request.app.state, "ready", False))
    return OrjsonResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("/v2/models/{name}")
async def model_metadata(name: ModelName, services: ServicesDep, _key: Reader) -> OrjsonResponse:
    """Inputs, outputs and versions (variants) of a model."""
    return OrjsonResponse(await services.inference.describe(name, None))


@router.get("/v2/models/{name}/versions/{variant}")
async def variant_metadata(name: ModelName, variant: VariantName, services: ServicesDep,
                           _key: Reader) -> OrjsonResponse:
    """Metadata of one variant."""
    return OrjsonResponse(await services.inference.describe(name, variant))


@router.get("/v2/models/{name}/ready")
async def model_ready(name: ModelName, services: ServicesDep, _key: Reader) -> OrjsonResponse:
    """200 when the model can serve predictions."""
    await services.inference.describe(name, None)
    return OrjsonResponse({"name": name, "ready": True})


@router.get("/v2/models/{name}/versions/{variant}/ready")
async def variant_ready(name: ModelName, variant: VariantName, services: ServicesDep, _key: Reader) -> OrjsonResponse:
    """200 when the variant can serve predictions."""
    await services.inference.describe(name, variant)
    return OrjsonResponse({"name": name, "version": variant, "ready": True})


async def _infer(request: Request, name: str, variant: str | None) -> Response:
    started = perf_counter()
    services: Services = request.app.state.services
    body = await read_body(request, services.settings.max_request_bytes)
    payload, media_type, headers = await v2_infer(services, request.headers, name, variant, body, started)
    return Response(payload, media_type=media_type, headers=headers)


@router.post("/v2/models/{name}/infer", openapi_extra=_INFER_DOC)
async def infer(request: Request, name: ModelName) -> Response:
    """Run the model; routing picks the variant."""
    return await _infer(request, name, None)


@router.post("/v2/models/{name}/versions/{variant}/infer", openapi_extra=_INFER_DOC)
async def infer_variant(request: Request, name: ModelName, variant: VariantName) -> Response:
    """Run one variant, whatever the routing says."""
    return await _infer(request, name, variant)
