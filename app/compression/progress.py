"""Progress reporting and cooperative cancellation, shared by every step."""

from __future__ import annotations

import threading
from collections.abc import Callable

from app.compression.errors import Cancelled

# fraction in [0, 1] of the whole run, and a short stage name for humans
ProgressFn = Callable[[float, str], None]


def ignore_progress(_fraction: float, _stage: str) -> None:
    return None


class CancelToken:
    """Set by the caller; long stages call `check()` between and inside their loops."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("the compression was cancelled")


class StepProgress:
    """Maps a step's own 0..1 progress into its slice of the whole run."""

    def __init__(self, report: ProgressFn, start: float, end: float, stage: str, cancel: CancelToken) -> None:
        self._report = report
        self._start = start
        self._span = end - start
        self.stage = stage
        self.cancel = cancel
        self._last = 0.0

    def __call__(self, fraction: float, detail: str | None = None) -> None:
        self.cancel.check()
        # Never backwards: a step's sub-stages may each count from zero.
        fraction = self._last = min(max(fraction, self._last), 1.0)
        self._report(self._start + self._span * fraction, f"{self.stage}: {detail}" if detail else self.stage)
