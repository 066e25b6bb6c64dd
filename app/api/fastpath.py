"""ASGI fast path for the prediction endpoints.

A prediction for a small model costs tens of microseconds; FastAPI's middleware layers and route matching
cost several times that. This wrapper answers `POST /v2/models/{name}[/versions/{v}]/infer` and
`POST /models/{name}/predict` directly, with the same shared code, checks, errors and metrics as the routes,
and hands everything else (including the documented routes themselves) to the FastAPI app.
"""

from __future__ import annotations

import logging
from time import perf_counter
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from app.api.body import decode_body
from app.api.deps import Services
from app.api.predictions import plain_predict, v2_infer
from app.errors import InvalidInput, SlimServeError, TooLarge

log = logging.getLogger(__name__)


def match(path: str) -> tuple[str, str, str | None] | None:
    """(kind, model, variant) for a prediction path, else None."""
    parts = path.split("/")
    # /v2/models/{name}/infer and /v2/models/{name}/versions/{v}/infer
    if len(parts) == 5 and parts[1] == "v2" and parts[2] == "models" and parts[4] == "infer" and parts[3]:
        return "v2", parts[3], None
    if (len(parts) == 7 and parts[1] == "v2" and parts[2] == "models" and parts[4] == "versions"
            and parts[6] == "infer" and parts[3] and parts[5]):
        return "v2", parts[3], parts[5]
    if len(parts) == 4 and parts[1] == "models" and parts[3] == "predict" and parts[2]:
        return "predict", parts[2], None
    return None


class FastPath:
    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)  # the wrapped app's state, openapi(), routes...

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            target = match(scope["path"])
            services: Services | None = getattr(self.app.state, "services", None)
            if target is not None and services is not None:
                await self._predict(scope, receive, send, services, *target)
                return
        await self.app(scope, receive, send)

    async def _predict(self, scope: Scope, receive: Receive, send: Send, services: Services, kind: str,
                       name: str, variant: str | None) -> None:
        started = perf_counter()
        headers = Headers(scope=scope)
        try:
            body = await _read(receive, headers, services.settings.max_request_bytes)
            if kind == "v2":
                payload, media_type, extra = await v2_infer(services, headers, name, variant, body, started)
            else:
                payload, media_type, extra = await plain_predict(services, headers, name, body, started)
            status = 200
        except SlimServeError as exc:
            status, media_type, extra = exc.status_code, "application/json", {}
            payload = orjson.dumps({"error": exc.message, "code": exc.code})
            if status in (429, 503):
                extra["retry-after"] = "1"
        except Exception:
            log.exception("unhandled error on POST %s", scope["path"])
            status, media_type, extra = 500, "application/json", {}
            payload = orjson.dumps({"error": "internal server error", "code": "internal"})
        raw_headers = [(b"content-type", media_type.encode()), (b"content-length", str(len(payload)).encode())]
        raw_headers += [(key.encode(), value.encode("latin-1", "replace")) for key, value in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": payload})


async def _read(receive: Receive, headers: Headers, limit: int) -> bytes:
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the request body is {declared} bytes; the limit is {limit} (SLIMSERVE_MAX_REQUEST_BYTES)")
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidInput("the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise TooLarge(f"the request body is larger than the limit of {limit} bytes "
                           "(SLIMSERVE_MAX_REQUEST_BYTES)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return decode_body(body, headers.get("content-encoding"), limit)

