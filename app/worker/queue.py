"""Which queue runs jobs: the embedded child-process runner, or Celery; and the sweep that finds lost jobs."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Protocol

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.services.periodic import Periodic
from app.settings import Settings
from app.storage.db import transaction
from app.storage.tables import JobRow, utcnow
from app.worker.runner import pid_is_dead

log = logging.getLogger(__name__)


class JobQueue(Protocol):
    def enqueue(self, job_id: str) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def lost_jobs(factory: sessionmaker[Session], stale_seconds: float) -> list[str]:
    """Running jobs whose worker died (same host) or fell silent (any host)."""
    cutoff = utcnow() - timedelta(seconds=stale_seconds)
    with factory() as session:
        rows = session.execute(
            select(JobRow.id, JobRow.worker, JobRow.heartbeat_at).where(JobRow.state == "running")
        ).all()
    return [job_id for job_id, worker, beat in rows if pid_is_dead(worker) or beat is None or beat < cutoff]


def waiting_jobs(factory: sessionmaker[Session], limit: int) -> list[str]:
    with factory() as session:
        return list(session.scalars(
            select(JobRow.id).where(JobRow.state == "queued", JobRow.cancel_requested.is_(False))
            .order_by(JobRow.created_at).limit(limit)
        ).all())


def mark_not_enqueued(factory: sessionmaker[Session], job_id: str) -> None:
    with transaction(factory) as session:
        session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.state == "queued")
                        .values(stage="waiting for the broker"))


class CeleryQueue:
    """Publishes job ids to Celery; a sweep re-publishes jobs whose worker was lost or that never got out."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session]) -> None:
        from app.worker.celery_app import make_celery

        self._settings = settings
        self._factory = factory
        self._celery = make_celery(settings)
        self._periodic = Periodic("job sweep", max(settings.job_stale_seconds / 3, 1.0), self.sweep,
                                  final_run=False)

    def enqueue(self, job_id: str) -> None:
        from app.worker.celery_app import RUN_JOB

        try:
            self._celery.send_task(RUN_JOB, args=[job_id], queue=self._settings.celery_queue)
        except Exception:
            # The job is in the database; the sweep publishes it again once the broker answers.
            log.warning("could not publish job %s to the broker; it stays queued", job_id, exc_info=True)
            mark_not_enqueued(self._factory, job_id)

    async def start(self) -> None:
        await self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    def sweep(self) -> None:
        for job_id in lost_jobs(self._factory, self._settings.job_stale_seconds):
            log.warning("job %s lost its worker; publishing it again", job_id)
            self.enqueue(job_id)
        with self._factory() as session:
            stranded = session.scalars(select(JobRow.id).where(
                JobRow.state == "queued", JobRow.stage == "waiting for the broker")).all()
        for job_id in stranded:
            self.enqueue(job_id)


def make_queue(settings: Settings, factory: sessionmaker[Session]) -> JobQueue:
    if settings.queue == "celery":
        return CeleryQueue(settings, factory)
    from app.worker.embedded import EmbeddedQueue

    return EmbeddedQueue(settings, factory)
