"""Typed access to the long-lived objects on app.state, and API-key checks."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Path, Request

from app.errors import Forbidden, Unauthorized
from app.metrics import Metrics
from app.services.capture import TrafficCapture
from app.services.generation import GenerationService
from app.services.inference import InferenceService
from app.services.jobs import JobService
from app.services.latency import LatencyWindow
from app.services.models import ModelService
from app.services.routing import RoutingService
from app.settings import ApiKey, Settings
from app.storage.artifacts import ArtifactStore

audit = logging.getLogger("slimserve.audit")

# Path parameters, described once for /docs.
ModelName = Annotated[str, Path(description="The model's name", openapi_examples={"digits": {"value": "digits"}})]
VariantName = Annotated[str, Path(description="'original', or the name a compression gave the variant",
                                  openapi_examples={"int8-dynamic": {"value": "int8-dynamic"},
                                                    "original": {"value": "original"}})]
JobId = Annotated[str, Path(description="Job id (UUID)", openapi_examples={
    "job": {"value": "5f0c8a3e-2b7d-4c1e-9a51-0d6f3f1c2b9a"}})]


class Authenticator:
    """Checks `Authorization: Bearer <key>` or `X-API-Key`; every configured key is compared in constant time."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._keys = [(k, k.secret.encode()) for k in keys]
        self.enabled = bool(keys)

    def identify(self, headers: Mapping[str, str]) -> ApiKey | None:
        if not self.enabled:
            return None
        presented = headers.get("x-api-key")
        if presented is None:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            presented = token.strip() if scheme.lower() == "bearer" else None
        if not presented:
            raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key'")
        candidate = presented.encode()
        match = None
        for key, secret in self._keys:
            # No early exit: the time taken does not depend on which key matched.
            if hmac.compare_digest(candidate, secret):
                match = key
        if match is None:
            raise Unauthorized("the API key is not valid")
        return match

    def require(self, headers: Mapping[str, str], role: str) -> ApiKey | None:
        key = self.identify(headers)
        if key is not None and role == "admin" and key.role != "admin":
            raise Forbidden(f"key {key.key_id} may only predict and read; this action needs an admin key")
        return key


@dataclass
class Services:
    settings: Settings
    models: ModelService
    inference: InferenceService
    generation: GenerationService
    jobs: JobService
    capture: TrafficCapture
    routing: RoutingService
    store: ArtifactStore
    metrics: Metrics
    auth: Authenticator
    latency: LatencyWindow


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def require_reader(request: Request) -> ApiKey | None:
    return get_services(request).auth.require(request.headers, "predict")


def require_admin(request: Request) -> ApiKey | None:
    key = get_services(request).auth.require(request.headers, "admin")
    # Who did what, when: one JSON line per management action; the key itself never appears.
    audit.info(json.dumps({
        "event": "management", "time": datetime.now(UTC).isoformat(), "key_id": key.key_id if key else None,
        "method": request.method, "path": request.url.path,
        "client": request.client.host if request.client else None,
    }))
    return key


Reader = Annotated[ApiKey | None, Depends(require_reader)]
Admin = Annotated[ApiKey | None, Depends(require_admin)]
