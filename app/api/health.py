"""Prometheus exposition."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.api.deps import Services

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    """Request latency histograms and counters, per model and variant."""
    services: Services = request.app.state.services
    if not services.settings.public_metrics:
        services.auth.require(request.headers, "predict")
    body, content_type = services.metrics.render()
    return Response(body, media_type=content_type)
