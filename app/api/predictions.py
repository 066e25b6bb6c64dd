"""The prediction endpoints' work, shared by the FastAPI routes (documented in /docs) and the ASGI fast path."""

from __future__ import annotations

from collections.abc import Mapping

from app.api.deps import Services


async def v2_infer(services: Services, headers: Mapping[str, str], name: str, variant: str | None, body: bytes,
                   started: float) -> tuple[bytes, str, dict[str, str]]:
    """(body, media type, extra headers) of a V2 inference answer."""
    if services.auth.enabled:
        services.auth.require(headers, "predict")
    prediction = await services.inference.infer_v2(
        name=name, variant=variant, body=body, header_length=headers.get("inference-header-content-length"),
        started=started,
    )
    extra = {"server-timing": prediction.server_timing(), "x-variant": prediction.variant}
    if prediction.header_length is None:
        return prediction.body, "application/json", extra
    extra["inference-header-content-length"] = str(prediction.header_length)
    return prediction.body, "application/octet-stream", extra


async def plain_predict(services: Services, headers: Mapping[str, str], name: str, body: bytes,
                        started: float) -> tuple[bytes, str, dict[str, str]]:
    if services.auth.enabled:
        services.auth.require(headers, "predict")
    prediction = await services.inference.predict(name=name, body=body, started=started)
    return prediction.body, "application/json", {"server-timing": prediction.server_timing(),
                                                  "x-variant": prediction.variant}
