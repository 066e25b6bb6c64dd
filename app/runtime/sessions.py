"""onnxruntime sessions cached per artifact, opened lazily, run inline or on a bounded thread pool."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.errors import InferenceTimeout, NotReady
from app.formats.onnx_model import open_session

log = logging.getLogger(__name__)

# Runs measured before a model may be judged fast enough to run on the event loop.
_WARM_RUNS = 20
_EWMA_WEIGHT = 0.05


@dataclass(frozen=True, slots=True)
class SessionConfig:
    intra_op_threads: int = 1
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    max_concurrent: int = 2
    inline_max_seconds: float = 0.0002
    max_loaded_bytes: int | None = None
    """Sessions beyond this (by model file size) are closed least recently used first."""
    run_timeout_seconds: float | None = None
    """An inference still running after this long is stopped (onnxruntime's terminate flag)."""


LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """Per-variant overrides; None keeps the server's default."""

    intra_op_threads: int | None = None
    graph_optimization_level: str = "all"
    config_entries: tuple[tuple[str, str], ...] = ()
    """onnxruntime session config entries the variant itself needs (see its report's `session_config`)."""

    @property
    def tag(self) -> str:
        tag = f"t{self.intra_op_threads if self.intra_op_threads is not None else 'd'}-{self.graph_optimization_level}"
        if self.config_entries:
            tag += "-c" + hashlib.sha256(repr(self.config_entries).encode()).hexdigest()[:8]
        return tag


@dataclass(slots=True)
class LoadedSession:
    key: str
    session: ort.InferenceSession
    output_names: list[str]
    size_bytes: int = 0
    runs: int = 0
    seconds_per_row: float = 0.0

    def record(self, seconds: float, rows: int) -> None:
        per_row = seconds / max(rows, 1)
        self.runs += 1
        if self.runs == 1:
            self.seconds_per_row = per_row
        else:
            self.seconds_per_row += _EWMA_WEIGHT * (per_row - self.seconds_per_row)

    def runs_inline(self, rows: int, inline_max: float) -> bool:
        # A thread hop costs tens of microseconds: a call predicted cheaper than that runs on the loop.
        # Per-row cost measured at small batches overestimates large ones, so the guess errs towards the pool.
        return self.runs >= _WARM_RUNS and self.seconds_per_row * rows < inline_max


@dataclass(slots=True)
class RunResult:
    names: list[str]
    arrays: list[np.ndarray]
    queue_seconds: float
    infer_seconds: float


class SessionCache:
    """One session per artifact key per process; concurrent first requests open it once."""

    def __init__(self, config: SessionConfig, cache_dir: Path | None = None) -> None:
        self._config = config
        self._cache_dir = cache_dir
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
        self._sessions: OrderedDict[str, LoadedSession] = OrderedDict()
        self._open_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=config.max_concurrent, thread_name_prefix="infer")

    def _options(self, overrides: SessionOptions, level: ort.GraphOptimizationLevel) -> ort.SessionOptions:
        options = ort.SessionOptions()
        threads = overrides.intra_op_threads if overrides.intra_op_threads is not None \
            else self._config.intra_op_threads
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = level
        options.log_severity_level = 3
        for key, value in overrides.config_entries:
            options.add_session_config_entry(key, value)
        if threads == 1:
            # One thread has nobody to hand work to; spinning would only burn a core.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def get_loaded(self, key: str) -> LoadedSession | None:
        loaded = self._sessions.get(key)
        if loaded is not None and self._config.max_loaded_bytes is not None:
            self._sessions.move_to_end(key)  # the order only matters when there is a cap
        return loaded

    @property
    def loaded_count(self) -> int:
        return len(self._sessions)

    @property
    def loaded_bytes(self) -> int:
        return sum(s.size_bytes for s in list(self._sessions.values()))

    def open(self, key: str, path: Path, display_name: str,
             overrides: SessionOptions | None = None) -> LoadedSession:
        loaded = self._sessions.get(key)
        if loaded is not None:
            return loaded
        with self._guard:
            lock = self._open_locks.setdefault(key, threading.Lock())
        with lock:
            loaded = self._sessions.get(key)
            if loaded is None:
                if not path.is_file():
                    raise NotReady(f"the artifact of {display_name} is missing from storage")
                started = time.perf_counter()
                session, source = self._open_cached(key, path, display_name, overrides or SessionOptions())
                loaded = LoadedSession(key=key, session=session, size_bytes=path.stat().st_size,
                                       output_names=[o.name for o in session.get_outputs()])
                self._sessions[key] = loaded
                self._enforce_cap(keep=key)
                log.info("opened %s in %.1f ms (%s)", display_name, (time.perf_counter() - started) * 1e3, source)
        return loaded

    def cached_graph(self, key: str, overrides: SessionOptions) -> Path | None:
        if self._cache_dir is None or overrides.graph_optimization_level == "disabled":
            return None
        return self._cache_dir / f"{key}.{overrides.tag}.optimized.onnx"

    def _open_cached(self, key: str, path: Path, display_name: str,
                     overrides: SessionOptions) -> tuple[ort.InferenceSession, str]:
        """Open the graph onnxruntime optimized last time, or optimize now and keep the result for next time."""
        providers = list(self._config.providers)
        cached = self.cached_graph(key, overrides)
        if cached is not None and cached.is_file():
            try:
                options = self._options(overrides, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
                return open_session(cached, display_name=display_name, providers=providers,
                                    options=options), "optimized graph from cache"
            except Exception:
                log.warning("cached optimized graph of %s is unusable; optimizing again", display_name)
                cached.unlink(missing_ok=True)
        options = self._options(overrides, LEVELS[overrides.graph_optimization_level])
        if cached is not None:
            # Written next to its final name, then renamed: a crash never leaves half a cached graph.
            partial = cached.with_suffix(f".{os.getpid()}.part")
            options.optimized_model_filepath = str(partial)
            session = open_session(path, display_name=display_name, providers=providers, options=options)
            if partial.is_file():
                os.replace(partial, cached)
            return session, "optimized and cached"
        return open_session(path, display_name=display_name, providers=providers, options=options), "optimized"

    def _enforce_cap(self, keep: str) -> None:
        cap = self._config.max_loaded_bytes
        if cap is None:
            return
        while self.loaded_bytes > cap and len(self._sessions) > 1:
            oldest = next(iter(self._sessions))
            if oldest == keep:
                self._sessions.move_to_end(oldest)
                continue
            # Requests running on it keep their reference; new ones reopen it on demand.
            self.evict(oldest)
            log.info("closed session %s to stay under %d loaded bytes", oldest[:12], cap)

    def evict(self, key: str) -> None:
        """Close the session of `key`, and those of the same artifact opened with other options."""
        for existing in [k for k in list(self._sessions) if k == key or k.startswith(f"{key}-")]:
            self._sessions.pop(existing, None)
            with self._guard:
                self._open_locks.pop(existing, None)

    async def run(
        self, loaded: LoadedSession, feeds: dict[str, np.ndarray], output_names: list[str] | None, rows: int
    ) -> RunResult:
        names = output_names or loaded.output_names
        enqueued = time.perf_counter()
        if loaded.runs_inline(rows, self._config.inline_max_seconds):
            arrays = loaded.session.run(names, feeds)
            done = time.perf_counter()
            loaded.record(done - enqueued, rows)
            return RunResult(names, arrays, 0.0, done - enqueued)
        loop = asyncio.get_running_loop()
        options = ort.RunOptions()
        timeout = self._config.run_timeout_seconds
        # The flag is read by onnxruntime between kernels, so a runaway model stops without killing the process.
        timer = loop.call_later(timeout, _terminate, options) if timeout else None
        try:
            arrays, started, done = await loop.run_in_executor(self._executor, _timed_run, loaded, names, feeds,
                                                               options)
        except asyncio.CancelledError:
            options.terminate = True  # the caller is gone (a cancelled gRPC call): stop the work it asked for
            raise
        except Exception:
            if options.terminate:
                raise InferenceTimeout(f"the inference ran longer than {timeout:g} s and was stopped") from None
            raise
        finally:
            if timer is not None:
                timer.cancel()
        loaded.record(done - started, rows)
        return RunResult(names, arrays, started - enqueued, done - started)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._sessions.clear()


def _terminate(options: ort.RunOptions) -> None:
    options.terminate = True


def _timed_run(
    loaded: LoadedSession, names: list[str], feeds: dict[str, np.ndarray], options: ort.RunOptions,
) -> tuple[list[np.ndarray], float, float]:
    started = time.perf_counter()
    arrays = loaded.session.run(names, feeds, options)
    return arrays, started, time.perf_counter()
