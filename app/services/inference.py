"""Predictions: pick the variant, decode, run, encode, and record every request's latency."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import orjson

from app.errors import InvalidContent, InvalidInput, OutOfMemory, Overloaded, SlimServeError, VariantNotFound
from app.metrics import Metrics
from app.runtime import codecs
from app.runtime.batching import Batcher
from app.runtime.datatypes import TensorSpec
from app.runtime.sessions import LoadedSession, RunResult, SessionCache, SessionOptions
from app.services.capture import TrafficCapture
from app.services.catalog import Catalog, ModelEntry
from app.services.routing import ShadowTraffic, choose
from app.services.text import TextAnswer, TextModels, decode_texts
from app.storage.artifacts import ArtifactStore

PROTOCOL_V2 = "v2"
PROTOCOL_PREDICT = "predict"
PROTOCOL_OPENAI = "openai"
PROTOCOL_GRPC = "grpc"


@dataclass(slots=True)
class _Attempt:
    """How far a request got: the model and variant its failure is counted under."""

    model: str = ""
    variant: str = ""


@dataclass(slots=True)
class TensorAnswer:
    """A V2 request answered, before a transport encodes it."""

    request_model: str
    variant: str
    request: codecs.InferenceRequest
    names: list[str]
    arrays: list[np.ndarray]
    specs: dict[str, TensorSpec]
    parameters: dict[str, Any] | None
    result: RunResult


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


def text_padding(entry: ModelEntry) -> dict[str, int] | None:
    """The token inputs the batcher may pad to batch texts of any length, unless the model batches by bucket."""
    if entry.text is None or (entry.batching or {}).get("text_padding", "bucket") != "longest":
        return None
    pads = {"input_ids": int(entry.text["pad_id"]), "attention_mask": 0, "token_type_ids": 0}
    return {name: pads[name] for name in entry.text["inputs"] if name in pads}


def _refuse_generation(entry: ModelEntry) -> None:
    if entry.generation is not None:
        raise InvalidInput(f"model '{entry.name}' generates text: use POST /v2/models/{entry.name}/generate "
                           "(or generate_stream), or OpenAI's /v1/completions and /v1/chat/completions",
                           code="generation_model")


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
        self._texts = TextModels(store)
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
            path = await asyncio.to_thread(self._store.model, target.sha256)
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
            "platform": "onnxruntime_genai" if entry.generation is not None else "onnxruntime_onnx",
            "inputs": [spec.to_json() for spec in entry.inputs.values()],
            "outputs": [spec.to_json() for spec in entry.outputs.values()],
        }

    @property
    def limits(self) -> codecs.Limits:
        return self._limits

    async def infer_v2(
        self, *, name: str, variant: str | None, body: bytes, header_length: str | None, started: float
    ) -> Prediction:
        """V2 over REST: JSON, or a JSON header and binary tensors."""
        with self._failures_counted(PROTOCOL_V2, started) as attempt:
            answer = await self._infer_request(
                name, variant, attempt,
                lambda entry: codecs.decode_v2(body, header_length, entry.inputs, self._limits))
            payload, header = codecs.encode_v2(
                model=name, variant=answer.variant, request=answer.request, names=answer.names,
                results=answer.arrays, specs=answer.specs, parameters=answer.parameters,
            )
        return self._finish(name, answer.variant, PROTOCOL_V2, payload, header, answer.result, started)

    async def infer_tensors(
        self, *, name: str, variant: str | None, protocol: str, started: float,
        decode: Callable[[ModelEntry], codecs.InferenceRequest],
    ) -> TensorAnswer:
        """V2 over another transport (gRPC): `decode` turns its message into a request against the model's
        inputs; the caller encodes the answer and then calls `finished`."""
        with self._failures_counted(protocol, started) as attempt:
            return await self._infer_request(name, variant, attempt, decode)

    def finished(self, answer: TensorAnswer, protocol: str, started: float) -> None:
        self._finish(answer.request_model, answer.variant, protocol, b"", None, answer.result, started)

    async def _infer_request(
        self, name: str, variant: str | None, attempt: _Attempt,
        decode: Callable[[ModelEntry], codecs.InferenceRequest],
    ) -> TensorAnswer:
        entry = await self._catalog.get(name)
        attempt.model, attempt.variant = name, variant or entry.default_variant
        _refuse_generation(entry)
        request = decode(entry)
        codecs.check_requested_outputs(request, entry.outputs)
        chosen, shadow = (variant, None) if variant is not None else choose(entry, request.id)
        attempt.variant = chosen
        loaded = await self.load(entry, chosen)
        wanted = [o.name for o in request.outputs] if request.outputs is not None else None
        parameters: dict[str, Any] | None = None
        if entry.text is not None:
            feeds, result, answer = await self._run_text(entry, chosen, loaded, request.inputs["text"])
            names, arrays = answer.names, answer.arrays
            parameters = {"warnings": answer.warnings} if answer.warnings else None
        else:
            # onnxruntime takes string tensors as str; converted once, for the run and the shadow run alike.
            feeds = {name: codecs.as_strings(array, name) if entry.inputs[name].datatype == "BYTES" else array
                     for name, array in request.inputs.items()}
            result = await self._run(entry, chosen, loaded, feeds, wanted, request.rows)
            names, arrays = result.names, result.arrays
        self._offer(entry, request.inputs, request.rows)
        if shadow is not None:
            self._shadow(entry, shadow, feeds, result, len(next(iter(feeds.values()))))
        return TensorAnswer(name, chosen, request, names, arrays, entry.outputs, parameters, result)

    async def predict(self, *, name: str, body: bytes, started: float) -> Prediction:
        with self._failures_counted(PROTOCOL_PREDICT, started) as attempt:
            payload_in = codecs.parse_json(body)
            variant = payload_in.get("variant") if isinstance(payload_in, dict) else None
            if variant is not None and not isinstance(variant, str):
                raise InvalidInput("'variant' must be a string")
            request_id = payload_in.get("id") if isinstance(payload_in, dict) else None
            entry = await self._catalog.get(name)
            attempt.model, attempt.variant = name, variant or entry.default_variant
            _refuse_generation(entry)
            inputs = codecs.decode_predict(payload_in, entry.inputs, self._limits)
            chosen, shadow = (variant, None) if variant is not None else choose(
                entry, str(request_id) if request_id is not None else None)
            attempt.variant = chosen
            loaded = await self.load(entry, chosen)
            rows = codecs.count_rows(inputs, entry.inputs)
            warnings: list[str] = []
            if entry.text is not None:
                feeds, result, answer = await self._run_text(entry, chosen, loaded, inputs["text"])
                names, arrays, warnings = answer.names, answer.arrays, answer.warnings
            else:
                feeds = inputs
                result = await self._run(entry, chosen, loaded, inputs, None, rows)
                names, arrays = result.names, result.arrays
            self._offer(entry, inputs, rows)
            elapsed_ms = (time.perf_counter() - started) * 1e3
            response: dict[str, Any] = {
                "model": name, "variant": chosen,
                "outputs": codecs.encode_outputs_nested(names, arrays),
                "latency_ms": round(elapsed_ms, 3),
            }
            if warnings:
                response["warnings"] = warnings
            payload = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
        if shadow is not None:
            self._shadow(entry, shadow, feeds, result, len(next(iter(feeds.values()))))
        return self._finish(name, chosen, PROTOCOL_PREDICT, payload, None, result, started)

    @contextlib.contextmanager
    def _failures_counted(self, protocol: str, started: float) -> Iterator[_Attempt]:
        """Count a refused or failed request under the model and variant it had reached (empty when unknown)."""
        attempt = _Attempt()
        try:
            yield attempt
        except SlimServeError as exc:
            self._metrics.observe_failure(model=attempt.model, variant=attempt.variant if attempt.model else "",
                                          protocol=protocol, code=exc.status_code,
                                          total_s=time.perf_counter() - started)
            raise

    async def _run_text(self, entry: ModelEntry, variant: str, loaded: LoadedSession,
                        values: Any) -> tuple[dict[str, Any], RunResult, TextAnswer]:
        """Tokenize on the server, run the token tensors, answer in the task's terms."""
        assert entry.text is not None
        if entry.text["task"] == "token-classification":  # an answer per token: one batch, as tokenized
            texts, encoded = await asyncio.to_thread(self._texts.encode, entry.text, values)
            result = await self._run(entry, variant, loaded, encoded.feeds, None, len(texts))
            return encoded.feeds, result, self._texts.answer(entry.text, texts, encoded, result.arrays[0])
        # An answer per text: texts of similar length run together, so a long one does not pad every other.
        texts, groups = await asyncio.to_thread(self._texts.encode_grouped, entry.text, values)
        results = await asyncio.gather(*(self._run(entry, variant, loaded, encoded.feeds, None, len(indexes))
                                         for indexes, encoded in groups))
        first = results[0].arrays[0]
        rows = np.empty((len(texts), *first.shape[1:]), dtype=first.dtype)
        for (indexes, _), part in zip(groups, results, strict=True):
            rows[indexes] = part.arrays[0]
        result = RunResult(results[0].names, [rows], max(r.queue_seconds for r in results),
                           sum(r.infer_seconds for r in results))
        encoded = self._texts.tokenizer(entry.text).merged(groups)
        return encoded.feeds, result, self._texts.answer(entry.text, texts, encoded, rows)

    async def embed(self, *, name: str, variant: str | None, texts: list[str],
                    started: float) -> tuple[str, np.ndarray, int, Prediction]:
        """OpenAI-style embeddings: (variant that answered, vectors, prompt tokens, timing) for an embeddings model."""
        with self._failures_counted(PROTOCOL_OPENAI, started) as attempt:
            entry = await self._catalog.get(name)
            attempt.model, attempt.variant = name, variant or entry.default_variant
            if entry.text is None or entry.text.get("task") != "embeddings":
                raise InvalidContent(f"model '{name}' is not a text embeddings model")
            if variant is not None and variant not in entry.variants:
                raise VariantNotFound(name, variant)
            chosen, shadow = (variant, None) if variant is not None else choose(entry, None)
            attempt.variant = chosen
            loaded = await self.load(entry, chosen)
            feeds, result, answer = await self._run_text(entry, chosen, loaded, texts)
            self._offer(entry, {"text": np.array(texts, dtype=object)}, len(texts))
        if shadow is not None:
            self._shadow(entry, shadow, feeds, result, len(texts))
        prediction = self._finish(name, chosen, PROTOCOL_OPENAI, b"", None, result, started)
        return chosen, answer.arrays[0], answer.prompt_tokens, prediction

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
            if entry.text is not None:  # texts are kept as text: a dataset of them is tokenized when it is used
                inputs = {"text": np.array(decode_texts(inputs["text"]), dtype=str)}
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
        batcher.pad = text_padding(entry)
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

