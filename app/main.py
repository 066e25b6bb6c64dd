"""Composition root: `create_app(settings)` builds every long-lived object in the lifespan."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from prometheus_client import multiprocess
from sqlalchemy.orm import Session, sessionmaker

from app.api import dashboard, generation, health, jobs, models, openai, predict, v2
from app.api.deps import Authenticator, Services
from app.api.errors import install_error_handlers
from app.api.fastpath import FastPath
from app.api.grpc_service import server as grpc_service
from app.api.v2 import server_version
from app.errors import Conflict, ModelNotFound
from app.metrics import Metrics
from app.runtime.codecs import Limits
from app.runtime.sessions import SessionCache, SessionConfig
from app.services.capture import TrafficCapture
from app.services.catalog import Catalog
from app.services.generation import GenerationService
from app.services.inference import InferenceService
from app.services.jobs import JobService
from app.services.latency import SNAPSHOT_SECONDS, LatencyWindow
from app.services.models import IncomingFile, ModelService, UploadLimits
from app.services.periodic import Periodic
from app.services.routing import RoutingService, ShadowTraffic
from app.settings import PreloadModel, Settings
from app.storage import repositories
from app.storage.artifacts import ArtifactStore
from app.storage.db import make_engine, make_session_factory, migrate
from app.storage.factory import open_store
from app.worker.queue import make_queue

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastPath:
    settings = settings if settings is not None else Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.resolved_database_url)
        await asyncio.to_thread(migrate, engine)
        session_factory = make_session_factory(engine)
        store = open_store(settings)
        store.clean_leftovers()
        catalog = Catalog(session_factory, settings.catalog_ttl_seconds)
        sessions = SessionCache(SessionConfig(
            intra_op_threads=settings.intra_op_threads,
            providers=tuple(settings.execution_providers),
            max_concurrent=settings.max_concurrent_inferences,
            inline_max_seconds=settings.inline_inference_max_ms / 1e3,
            max_loaded_bytes=settings.max_loaded_bytes,
            run_timeout_seconds=settings.inference_timeout_seconds,
        ), cache_dir=settings.data_dir / "cache" / "sessions")
        metrics = Metrics()
        metrics.watch_jobs(lambda: _job_stats(session_factory))
        queue = make_queue(settings, session_factory)
        model_service = ModelService(
            session_factory=session_factory, store=store, catalog=catalog, providers=settings.execution_providers,
            enqueue=queue.enqueue, limits=UploadLimits(max_unpacked_bytes=settings.max_unpacked_bytes,
                                                       max_archive_members=settings.max_archive_members,
                                                       max_context_tokens=settings.max_context_tokens),
        )
        capture = TrafficCapture(session_factory=session_factory, store=store, catalog=catalog,
                                 flush_seconds=settings.capture_flush_seconds)
        shadows = ShadowTraffic(session_factory=session_factory, metrics=metrics,
                                max_in_flight=2 * settings.max_concurrent_inferences)
        inference = InferenceService(
            catalog=catalog, sessions=sessions, store=store, metrics=metrics, capture=capture, shadows=shadows,
            max_queue=settings.max_queue,
            limits=Limits(max_batch_size=settings.max_batch_size, max_tensor_elements=settings.max_tensor_elements),
        )
        generation_service = GenerationService(
            catalog=catalog, store=store, metrics=metrics, max_generations=settings.max_generations,
            threads=settings.generation_threads, shadows=shadows, capture=capture)
        latency = LatencyWindow(metrics)
        latency_snapshots = Periodic("latency snapshots", SNAPSHOT_SECONDS, latency.snapshot, final_run=False)
        app.state.services = Services(
            settings=settings, models=model_service, inference=inference, generation=generation_service, store=store,
            metrics=metrics,
            auth=Authenticator(settings.api_keys), latency=latency,
            jobs=JobService(session_factory=session_factory, enqueue=queue.enqueue), capture=capture,
            routing=RoutingService(session_factory=session_factory, catalog=catalog),
        )
        for name, preload in settings.preload_models.items():
            await asyncio.to_thread(_preload, model_service, store, name, preload)
        await queue.start()
        await capture.start()
        await shadows.start()
        await latency_snapshots.start()
        grpc_server = await grpc_service.start(
            app.state.services, server_version(), lambda: bool(getattr(app.state, "ready", False)),
            share_port=settings.grpc_share_port) if settings.grpc_port else None
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            if grpc_server is not None:
                await grpc_service.stop(grpc_server)
            await latency_snapshots.stop()
            await shadows.stop()
            await capture.stop()
            await queue.stop()
            sessions.close()
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]  # live gauges leave the sums
            store.close()
            engine.dispose()

    app = FastAPI(
        title="SlimServe",
        summary="Upload a model, compress it, measure it, serve it over the Open Inference Protocol.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    _document_errors(app)
    app.include_router(v2.router)
    app.include_router(predict.router)
    app.include_router(openai.router)
    app.include_router(generation.router)
    app.include_router(models.router)
    app.include_router(jobs.router)
    app.include_router(health.router)
    app.include_router(dashboard.router)
    return FastPath(app)


def _document_errors(app: FastAPI) -> None:
    """Our 422s (like every error) are {"error", "code"}, not FastAPI's {"detail": [...]}: say so in /docs."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schemas = schema.get("components", {}).get("schemas", {})
            schemas.pop("ValidationError", None)
            schemas["HTTPValidationError"] = {
                "title": "Error", "type": "object", "required": ["error", "code"],
                "properties": {
                    "error": {"type": "string", "description": "What was wrong, naming the field or input",
                              "examples": ["body.recipe: Field required"]},
                    "code": {"type": "string", "description": "A stable machine-readable reason",
                             "examples": ["invalid_request"]}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _preload(service: ModelService, store: ArtifactStore, name: str, preload: PreloadModel) -> None:
    """Register a bundled model under `name` unless a model of that name exists already."""
    try:
        service.get(name)
        return
    except ModelNotFound:
        pass
    model = _copy_to_temp(store, preload.file)
    samples = _copy_to_temp(store, preload.samples) if preload.samples else None
    try:
        service.create(name=name, model=model, samples=samples)
        log.info("preloaded model %s from %s", name, preload.file)
    except Conflict:
        pass  # another replica registered it first
    finally:
        model.temp.discard()
        if samples is not None:
            samples.temp.discard()


def _copy_to_temp(store: ArtifactStore, path: Path) -> IncomingFile:
    temp = store.open_temp(max_bytes=path.stat().st_size + 1, what=str(path))
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            temp.write(chunk)
    return IncomingFile(filename=path.name, temp=temp)


def _job_stats(session_factory: sessionmaker[Session]) -> tuple[dict[str, int], dict[str, list[float]]]:
    with session_factory() as session:
        return repositories.job_stats(session)
