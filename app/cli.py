"""`slimserve` command line: run the server."""

from __future__ import annotations

import logging
import os
import resource
import shutil
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from app.commands import register
from app.settings import Settings

cli = typer.Typer(help="SlimServe: compress models, measure them, serve them.", no_args_is_help=True)


@cli.callback()
def _root() -> None:
    """SlimServe command line."""


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (SLIMSERVE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (SLIMSERVE_PORT)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory (SLIMSERVE_DATA_DIR)")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Server processes")] = 1,
) -> None:
    """Start the HTTP server (Open Inference Protocol, management API, /metrics) and gRPC beside it."""
    # Worker processes build their own Settings from the environment, so flags travel through it.
    for key, value in (("SLIMSERVE_HOST", host), ("SLIMSERVE_PORT", port), ("SLIMSERVE_DATA_DIR", data_dir)):
        if value is not None:
            os.environ[key] = str(value)
    try:
        settings = Settings()
    except ValidationError as exc:
        typer.echo(f"invalid configuration: {exc}", err=True)
        raise typer.Exit(2) from None
    if workers > 1:
        os.environ["SLIMSERVE_GRPC_SHARE_PORT"] = "1"  # each process binds the gRPC port; the kernel spreads calls
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several processes: each writes its metrics to files here and every scrape sums them.
        metrics_dir = settings.data_dir / "prometheus-multiproc"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())
    if settings.memory_limit_bytes is not None:
        # A soft limit: allocations beyond it fail inside onnxruntime (an error we answer), not in the kernel's
        # OOM killer; job processes raise it back for themselves.
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (settings.memory_limit_bytes, hard))
    import uvicorn

    uvicorn.run(
        "app.main:create_app", factory=True, host=settings.host, port=settings.port, workers=workers,
        loop="uvloop", http="httptools", access_log=False, log_level=settings.log_level,
        timeout_graceful_shutdown=10,
    )


@cli.command()
def worker(
    run_job: Annotated[str | None, typer.Option(help="Run this one job and exit (used by the embedded queue)")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs this worker runs at once")] = 1,
    server_pid: Annotated[int | None, typer.Option(hidden=True, help="The server that started this job")] = None,
) -> None:
    """Start a Celery worker for compression jobs (SLIMSERVE_QUEUE=celery, SLIMSERVE_BROKER_URL)."""
    try:
        settings = Settings()
    except ValidationError as exc:
        typer.echo(f"invalid configuration: {exc}", err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if run_job is not None:
        if server_pid is not None:
            from app.worker.embedded import enter_job_process

            enter_job_process(settings.worker_nice, server_pid)
        raise typer.Exit(0 if _run_one_job(settings, run_job) in ("succeeded", "skipped") else 1)
    if settings.queue != "celery":
        typer.echo("`slimserve worker` serves Celery: set SLIMSERVE_QUEUE=celery and SLIMSERVE_BROKER_URL "
                   "(in embedded mode the server runs jobs itself)", err=True)
        raise typer.Exit(2)
    from app.worker.celery_app import make_worker_app

    make_worker_app(settings).worker_main([
        "worker", f"--loglevel={settings.log_level.upper()}", f"--concurrency={concurrency}",
        "--queues", settings.celery_queue, "--hostname", f"slimserve-{socket.gethostname()}-{os.getpid()}@%h",
        "--without-gossip", "--without-mingle",
    ])


def _run_one_job(settings: Settings, job_id: str) -> str:
    from app.storage.db import make_engine, make_session_factory
    from app.storage.factory import open_store
    from app.worker.runner import JobRunner

    engine = make_engine(settings.resolved_database_url)
    store = open_store(settings)
    try:
        return JobRunner(
            session_factory=make_session_factory(engine), store=store, max_attempts=settings.job_max_attempts,
            heartbeat_seconds=settings.job_heartbeat_seconds, stale_seconds=settings.job_stale_seconds,
            threads=settings.compression_threads,
        ).run(job_id)
    finally:
        store.close()
        engine.dispose()


register(cli)


def main() -> None:
    sys.exit(cli())
