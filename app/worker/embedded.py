"""Embedded mode: the server runs each job in a child process at a lower CPU priority."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import resource
import signal
import socket
import sys
import time

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings
from app.storage.db import transaction
from app.storage.tables import JobRow, utcnow
from app.worker.queue import lost_jobs, waiting_jobs

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# A job asked to stop gets this long to stop by itself before its process is killed.
CANCEL_GRACE_SECONDS = 10.0


def enter_job_process(niceness: int, server_pid: int) -> None:
    """Called first thing in a job process the server started. Done here, after exec, not in a preexec_fn: Python
    code between fork and exec in a server full of threads (onnxruntime's, the event loop's) can deadlock."""
    os.nice(niceness)
    # The server's memory cap is for predictions; a job (torch, calibration) gets the hard limit.
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    # If the server dies, its jobs die with it and are run again after the restart, never twice at once.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server_pid:  # the server died before the line above: nobody would kill this job
        raise SystemExit(f"the server (process {server_pid}) is gone; the job runs again when it restarts")


class EmbeddedQueue:
    def __init__(self, settings: Settings, factory: sessionmaker[Session]) -> None:
        self._settings = settings
        self._factory = factory
        self._children: dict[str, asyncio.subprocess.Process] = {}
        self._cancel_seen: dict[str, float] = {}
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def enqueue(self, job_id: str) -> None:
        """Thread-safe: the job is already in the database; this only wakes the scheduler."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._schedule_forever(), name="slimserve-embedded-jobs")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for process in self._children.values():
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        for process in self._children.values():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), timeout=10)
        self._children.clear()

    async def _schedule_forever(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.to_thread(self._enforce_cancellations)
                await self._launch()
            except Exception:
                log.warning("job scheduling failed; retrying", exc_info=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            self._wake.clear()

    async def _launch(self) -> None:
        for job_id, process in list(self._children.items()):
            if process.returncode is not None:
                del self._children[job_id]
                self._cancel_seen.pop(job_id, None)
        free = self._settings.embedded_workers - len(self._children)
        if free <= 0:
            return
        lost = await asyncio.to_thread(lost_jobs, self._factory, self._settings.job_stale_seconds)
        waiting = await asyncio.to_thread(waiting_jobs, self._factory, free + len(self._children))
        for job_id in [j for j in lost + waiting if j not in self._children][:free]:
            self._children[job_id] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "app", "worker", "--run-job", job_id, "--server-pid", str(os.getpid()),
                env={**os.environ, **self._settings.worker_env()},
            )
            log.info("job %s started in process %d", job_id, self._children[job_id].pid)

    def _enforce_cancellations(self) -> None:
        if not self._children:
            return
        with self._factory() as session:
            asked = set(session.scalars(select(JobRow.id).where(
                JobRow.id.in_(list(self._children)), JobRow.cancel_requested.is_(True),
                JobRow.state == "running")).all())
        now = time.monotonic()
        for job_id in asked:
            first = self._cancel_seen.setdefault(job_id, now)
            process = self._children.get(job_id)
            if process is None or process.returncode is not None or now - first < CANCEL_GRACE_SECONDS:
                continue
            log.warning("job %s did not stop when asked; killing process %d", job_id, process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with transaction(self._factory) as session:
                session.execute(update(JobRow).where(
                    JobRow.id == job_id, JobRow.state == "running",
                    JobRow.worker == f"{socket.gethostname()}:{process.pid}",
                ).values(state="cancelled", stage="cancelled", finished_at=utcnow()))
