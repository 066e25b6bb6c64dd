"""Dynamic batching: concurrent requests for one session are stacked into one onnxruntime call.

While a call runs, arriving requests wait; the next call takes every waiting request of the same shape (up to
`max_batch_size` rows). An idle session runs a request at once unless `max_queue_delay_ms` asks to wait for
company, so batching costs no latency at low load and forms batches exactly when the model is busy.

With `pad` (a text model's token inputs and their padding values), requests of different sequence lengths batch
together: each is padded on axis 1 to the longest of the call, and outputs that keep a sequence axis (rank 3 or
more, as token classification's) are cut back to each request's own length.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from app.runtime.sessions import LoadedSession, RunResult, SessionCache


@dataclass
class _Request:
    feeds: dict[str, np.ndarray]
    names: list[str] | None
    rows: int
    key: tuple[object, ...]
    future: asyncio.Future[RunResult]
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, sessions: SessionCache, loaded: LoadedSession, *, max_batch_size: int,
                 max_queue_delay_s: float, on_call: Callable[[int], None], pad: dict[str, int] | None = None) -> None:
        self.pad = pad
        self._sessions = sessions
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self._on_call = on_call
        self._waiting: list[_Request] = []
        self._draining = False

    async def run(self, feeds: dict[str, np.ndarray], names: list[str] | None, rows: int) -> RunResult:
        # Requests stack only when every input agrees beyond the batch axis (beyond the sequence axis, for inputs
        # this batcher may pad).
        pad = self.pad or {}
        key = (tuple(names or ()), tuple((n, a.dtype.str, a.shape[2:] if n in pad else a.shape[1:])
                                         for n, a in sorted(feeds.items())))
        future: asyncio.Future[RunResult] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Request(feeds, names, rows, key, future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                if self.max_queue_delay_s > 0 and sum(r.rows for r in self._waiting) < self.max_batch_size:
                    await asyncio.sleep(self.max_queue_delay_s)
                group = self._take_group()
                await self._run_group(group)
        finally:
            self._draining = False

    def _take_group(self) -> list[_Request]:
        first = self._waiting[0]
        group: list[_Request] = []
        rest: list[_Request] = []
        rows = 0
        for request in self._waiting:
            if request.key == first.key and (not group or rows + request.rows <= self.max_batch_size):
                group.append(request)
                rows += request.rows
            else:
                rest.append(request)
        self._waiting = rest
        return group

    async def _run_group(self, group: list[_Request]) -> None:
        if len(group) == 1:
            await self._run_alone(group[0])
            return
        lengths = [_length(r.feeds, self.pad) for r in group]
        longest = max(lengths)
        feeds = {name: np.concatenate([_padded(r.feeds[name], longest, (self.pad or {}).get(name)) for r in group])
                 for name in group[0].feeds}
        total = sum(r.rows for r in group)
        started = time.perf_counter()
        try:
            result = await self._sessions.run(self.loaded, feeds, group[0].names, total)
        except Exception:
            # One bad request must not fail the others: run each alone so only its own call fails.
            for request in group:
                await self._run_alone(request)
            return
        self._on_call(total)
        if any(len(array) != total for array in result.arrays):
            for request in group:  # an output without a batch axis cannot be split back
                await self._run_alone(request)
            return
        offset = 0
        for request, length in zip(group, lengths, strict=True):
            arrays = [array[offset:offset + request.rows] for array in result.arrays]
            if length < longest:  # a sequence axis comes back at the call's length: cut to the request's own
                arrays = [a[:, :length] if a.ndim >= 3 and a.shape[1] == longest else a for a in arrays]
            offset += request.rows
            queued = started - request.enqueued + result.queue_seconds
            if not request.future.done():
                request.future.set_result(RunResult(result.names, arrays, queued, result.infer_seconds))

    async def _run_alone(self, request: _Request) -> None:
        started = time.perf_counter()
        try:
            result = await self._sessions.run(self.loaded, request.feeds, request.names, request.rows)
        except Exception as exc:
            if not request.future.done():
                request.future.set_exception(exc)
            return
        self._on_call(request.rows)
        result.queue_seconds += started - request.enqueued
        if not request.future.done():
            request.future.set_result(result)


def _length(feeds: dict[str, np.ndarray], pad: dict[str, int] | None) -> int:
    names = [n for n in feeds if pad and n in pad]
    return int(feeds[names[0]].shape[1]) if names else 0


def _padded(array: np.ndarray, length: int, value: int | None) -> np.ndarray:
    if value is None or array.ndim < 2 or array.shape[1] == length:
        return array
    widths = [(0, 0), (0, length - array.shape[1])] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths, constant_values=value)
