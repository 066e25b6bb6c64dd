"""Celery wiring for scaled-out workers: a thin task that only calls the job runner."""

from __future__ import annotations

from celery import Celery

from app.settings import Settings

RUN_JOB = "slimserve.run_job"


def make_celery(settings: Settings) -> Celery:
    app = Celery("slimserve", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        # Acknowledge after the job, and give it back if the worker process dies: a killed worker's job is
        # delivered again. The runner's claim makes a second delivery of a live job a no-op.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.celery_queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.celery_visibility_timeout},
        worker_hijack_root_logger=False,
    )
    return app


def make_worker_app(settings: Settings) -> Celery:
    """The worker side: the task builds its runner once per process."""
    from app.storage.db import make_engine, make_session_factory, migrate
    from app.storage.factory import open_store
    from app.worker.runner import JobRunner

    app = make_celery(settings)
    state: dict[str, JobRunner] = {}

    def runner() -> JobRunner:
        if "runner" not in state:
            engine = make_engine(settings.resolved_database_url)
            migrate(engine)
            state["runner"] = JobRunner(
                session_factory=make_session_factory(engine), store=open_store(settings),
                max_attempts=settings.job_max_attempts, heartbeat_seconds=settings.job_heartbeat_seconds,
                stale_seconds=settings.job_stale_seconds, threads=settings.compression_threads,
                enqueue=lambda job_id: app.send_task(RUN_JOB, args=[job_id], queue=settings.celery_queue),
            )
        return state["runner"]

    @app.task(name=RUN_JOB)  # type: ignore[untyped-decorator]
    def run_job(job_id: str) -> str:
        return runner().run(job_id)

    return app
