"""Predictions: pick the variant, decode, run, encode, and record every request's latency."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Any

import orjson

from app.errors import InvalidContent, InvalidInput, OutOfMemory, Overloaded, SlimServeError, VariantNotFound
from app.metrics import Metrics
from app.runtime import codecs
from app.runtime.batching import Batcher
from app.runtime.sessions import LoadedSession, RunResult, SessionCache, SessionOptions
from app.services.capture import TrafficCapture
from app.services.catalog import Catalog, ModelEntry
from app.services.routing import ShadowTraffic, choose
from app.storage.artifacts import ArtifactStore

PROTOCOL_V2 = "v2"
PROTOCOL_PREDICT = "predict"
MODEL_SUFFIX = ".onnx"


@dataclass(slots=True)
class Prediction:
    body: bytes
    header_length: int | None
    variant: str
    queue_seconds: float
    infer_seconds: float
    total_seconds: float

    def server_timing(self) -> str:
        return (
            f"queue;dur={self.queue_seconds * 1e3:.3f}, infer;dur={self.infer_seconds * 1e3:.3f}, "
            f"total;dur={self.total_seconds * 1e3:.3f}"
        )


class InferenceService:
    def __init__(
        self, *, catalog: Catalog, sessions: SessionCache, store: ArtifactStore, metrics: Metrics,
        limits: codecs.Limits, capture: TrafficCapture | None = None, shadows: ShadowTraffic | None = None,
        max_queue: int = 256,
    ) -> None:
        self._catalog = catalog
        self._sessions = sessions
        self._store = store
        self._metrics = metrics
        self._limits = limits
        self._capture = capture
        self._shadows = shadows
        self._batchers: dict[str, Batcher] = {}
        self._max_queue = max_queue
        self._in_flight: dict[str, int] = {}

    async def load(self, entry: ModelEntry, variant: str) -> LoadedSession:
        target = entry.variants.get(variant)
        if target is None:
            raise VariantNotFound(entry.name, variant)
        overrides = entry.session_options.get(variant)
        if target.session_config:
            overrides = replace(overrides or SessionOptions(), config_entries=target.session_config)
        key = target.sha256 if overrides is None else f"{target.sha256}-{overrides.tag}"
        loaded = self._sessions.get_loaded(key)
        if loaded is None:
            path = await asyncio.to_thread(self._store.local, target.sha256, MODEL_SUFFIX)
            loaded = await asyncio.to_thread(self._sessions.open, key, path, f"{entry.name}/{variant}", overrides)
            self._metrics.model_size.labels(entry.name, variant).set(target.size_bytes)
            self._metrics.loaded_models.set(self._sessions.loaded_count)
            self._metrics.loaded_bytes.set(self._sessions.loaded_bytes)
        return loaded

    async def describe(self, name: str, variant: str | None) -> dict[str, Any]:
        """V2 model metadata; a variant is a version."""
        entry = await self._catalog.get(name)
        if variant is not None and variant not in entry.variants:
            raise VariantNotFound(name, variant)
        return {
            "name": name,
            "versions": [variant] if variant is not None else list(entry.variants),
            "platform": "onnxruntime_onnx",
            "inputs": [spec.to_json() for spec in entry.inputs.values()],
            "outputs": [spec.to_json() for spec in entry.outputs.values()],
        }

    async def infer_v2(
        self, *, name: str, variant: str | None, body: bytes, header_length: str | None, started: float
    ) -> Prediction:
        chosen = variant or ""
        model_label = ""
        try:
            entry = await self._catalog.get(name)
            model_label, chosen = name, variant or entry.default_variant
            request = codecs.decode_v2(body, header_length, entry.inputs, self._limits)
            codecs.check_requested_outputs(request, entry.outputs)
            chosen, shadow = (variant, None) if variant is not None else choose(entry, request.id)
            loaded = await self.load(entry, chosen)
            wanted = [o.name for o in request.outputs] if request.outputs is not None else None
            result = await self._run(entry, chosen, loaded, request.inputs, wanted, request.rows)
            self._offer(entry, request.inputs, request.rows)
            payload, header = codecs.encode_v2(
                model=name, variant=chosen, request=request, names=result.names, results=result.arrays,
                specs=entry.outputs,
            )
        except SlimServeError as exc:
            self._metrics.observe_failure(model=model_label, variant=chosen if model_label else "",
                                          protocol=PROTOCOL_V2, code=exc.status_code,
                                          total_s=time.perf_counter() - started)
            raise
        if shadow is not None:
            self._shadow(entry, shadow, request.inputs, result, request.rows)
        return self._finish(name, chosen, PROTOCOL_V2, payload, header, result, started)

    async def predict(self, *, name: str, body: bytes, started: float) -> Prediction:
        chosen = ""
        model_label = ""
        try:
            payload_in = codecs.parse_json(body)
            variant = payload_in.get("variant") if isinstance(payload_in, dict) else None
            if variant is not None and not isinstance(variant, str):
                raise InvalidInput("'variant' must be a string")
            request_id = payload_in.get("id") if isinstance(payload_in, dict) else None
            entry = await self._catalog.get(name)
            model_label, chosen = name, variant or entry.default_variant
            inputs = codecs.decode_predict(payload_in, entry.inputs, self._limits)
            chosen, shadow = (variant, None) if variant is not None else choose(
                entry, str(request_id) if request_id is not None else None)
            loaded = await self.load(entry, chosen)
            rows = codecs.count_rows(inputs, entry.inputs)
            result = await self._run(entry, chosen, loaded, inputs, None, rows)
            self._offer(entry, inputs, rows)
            elapsed_ms = (time.perf_counter() - started) * 1e3
            response: dict[str, Any] = {
                "model": name, "variant": chosen,
                "outputs": codecs.encode_outputs_nested(result.names, result.arrays),
                "latency_ms": round(elapsed_ms, 3),
            }
            payload = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
        except SlimServeError as exc:
            self._metrics.observe_failure(model=model_label, variant=chosen if model_label else "",
                                          protocol=PROTOCOL_PREDICT, code=exc.status_code,
                                          total_s=time.perf_counter() - started)
            raise
        if shadow is not None:
            self._shadow(entry, shadow, inputs, result, rows)
        return self._finish(name, chosen, PROTOCOL_PREDICT, payload, None, result, started)

    def _shadow(self, entry: ModelEntry, variant: str, inputs: dict[str, Any], result: RunResult, rows: int) -> None:
        if self._shadows is not None:
            self._shadows.submit(model=entry.name, variant=variant, inputs=inputs, output=result.names[0],
                                 answer=result.arrays[0], primary_seconds=result.infer_seconds,
                                 run=lambda m, v, x, o: self._run_shadow(m, v, x, o, rows))

    async def _run_shadow(self, model: str, variant: str, inputs: dict[str, Any], output: str,
                          rows: int) -> tuple[Any, float]:
        entry = await self._catalog.get(model)
        loaded = await self.load(entry, variant)
        result = await self._sessions.run(loaded, inputs, [output], rows)
        return result.arrays[0], result.infer_seconds

    def _offer(self, entry: ModelEntry, inputs: dict[str, Any], rows: int) -> None:
        if entry.capture_samples and self._capture is not None:
            batched = all(spec.has_dynamic_batch for spec in entry.inputs.values())
            self._capture.offer(entry.name, entry.capture_samples, inputs, rows, batched)

    async def _run(
        self, entry: ModelEntry, variant: str, loaded: LoadedSession, inputs: dict[str, Any],
        wanted: list[str] | None, rows: int,
    ) -> RunResult:
        waiting = self._in_flight.get(loaded.key, 0)
        if waiting >= self._max_queue:
            raise Overloaded(f"{entry.name}/{variant} already has {waiting} requests waiting "
                             f"(SLIMSERVE_MAX_QUEUE={self._max_queue}); retry shortly")
        self._in_flight[loaded.key] = waiting + 1
        try:
            if entry.batching is not None:
                return await self._batcher(entry, variant, loaded).run(inputs, wanted, rows)
            result = await self._sessions.run(loaded, inputs, wanted, rows)
            self._metrics.observe_batch(entry.name, variant, rows)
            return result
        except SlimServeError:
            raise
        except Exception as exc:
            if "Failed to allocate memory" in str(exc) or isinstance(exc, MemoryError):
                raise OutOfMemory("this input would need more memory than the server may use "
                                  "(SLIMSERVE_MEMORY_LIMIT_BYTES); send a smaller batch") from None
            # Types and shapes were checked already, so what is left depends on the values sent.
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise InvalidContent(f"the model failed on this input: {text}") from None
        finally:
            self._in_flight[loaded.key] -= 1

    def _batcher(self, entry: ModelEntry, variant: str, loaded: LoadedSession) -> Batcher:
        assert entry.batching is not None
        batcher = self._batchers.get(loaded.key)
        if batcher is None or batcher.loaded is not loaded:
            batcher = self._batchers[loaded.key] = Batcher(
                self._sessions, loaded, max_batch_size=entry.batching["max_batch_size"],
                max_queue_delay_s=entry.batching["max_queue_delay_ms"] / 1e3,
                on_call=lambda rows: self._metrics.observe_batch(entry.name, variant, rows),
            )
        batcher.max_batch_size = entry.batching["max_batch_size"]
        batcher.max_queue_delay_s = entry.batching["max_queue_delay_ms"] / 1e3
        return batcher

    def _finish(
        self, name: str, variant: str, protocol: str, payload: bytes, header: int | None, result: RunResult,
        started: float,
    ) -> Prediction:
        total = time.perf_counter() - started
        self._metrics.observe_success(
            model=name, variant=variant, protocol=protocol, total_s=total, queue_s=result.queue_seconds,
            infer_s=result.infer_seconds,
        )
        return Prediction(payload, header, variant, result.queue_seconds, result.infer_seconds, total)

    def forget(self, sha256s: list[str]) -> None:
        for sha in sha256s:
            self._sessions.evict(sha)
        self._metrics.loaded_models.set(self._sessions.loaded_count)
        self._metrics.loaded_bytes.set(self._sessions.loaded_bytes)

