"""A background loop that runs blocking work every few seconds in a thread, and once more when stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    def __init__(self, name: str, seconds: float, work: Callable[[], None], *, final_run: bool = True) -> None:
        self._name = name
        self._seconds = seconds
        self._work = work
        self._final_run = final_run
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._forever(), name=f"slimserve-{self._name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._final_run:
            try:
                await asyncio.to_thread(self._work)
            except Exception:
                log.warning("%s failed at shutdown", self._name, exc_info=True)

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(self._seconds)
            try:
                await asyncio.to_thread(self._work)
            except Exception:  # the database or the broker may blink; the next round retries
                log.warning("%s failed; will retry", self._name, exc_info=True)
