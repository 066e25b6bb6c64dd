"""Generation requests: pick the variant, render the chat, bound the work, stream tokens, count them.

Every protocol (OpenAI completions and chat, Triton's generate extension) comes through `start`, which checks
the whole request before any token is generated: the prompt and `max_tokens` against the context, the
sampling parameters, the number of generations already running for the model (beyond the bound: 429 with
Retry-After). Requests for one variant share its loaded model.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.errors import InvalidContent, InvalidInput, Overloaded, SlimServeError, VariantNotFound
from app.generation.engine import CANCELLED, Finished, Generation, GenerationModel, Piece
from app.generation.sampling import SamplingParams
from app.metrics import Metrics
from app.services.capture import TrafficCapture
from app.services.catalog import Catalog, ModelEntry
from app.services.routing import ShadowTraffic, choose
from app.storage.artifacts import ArtifactStore
from app.text.chat import ChatTemplate, check_messages
from app.text.datasets import TEXT

log = logging.getLogger(__name__)

Disconnected = Callable[[], Awaitable[bool]]
CLIENT_CLOSED = 499


@dataclass
class Prompt:
    """What to continue: a text (completions, generate) or chat messages rendered by the model's template."""

    text: str | None = None
    messages: list[Any] | None = None


class Running:
    """A started generation: its pieces as they come, then its end; counted in the metrics once."""

    def __init__(self, service: GenerationService, entry: ModelEntry, variant: str, shadow: str | None,
                 model: GenerationModel, prompt_text: str, prompt_ids: list[int], params: SamplingParams,
                 max_tokens: int, protocol: str, started: float) -> None:
        self.model, self.variant = entry.name, variant
        self._capture_samples, self._prompt_text = entry.capture_samples, prompt_text
        self.prompt_tokens = len(prompt_ids)
        self.max_tokens = max_tokens
        self._service, self._shadow, self._prompt_ids = service, shadow, prompt_ids
        self._protocol, self._started = protocol, started
        self._generation = Generation(model, prompt_ids, params, max_tokens, started, self.ended)

    def ended(self, finished: Finished | None) -> None:
        """The generation's thread has ended: count it (cancelled ones too) and free its slot."""
        self._service.release(self.model)
        if finished is None:
            self._service.failed(self.model, self.variant, self._protocol, 500, self._started)
            return
        self._service.finished(self, finished, self._protocol, self._started)
        if finished.reason == CANCELLED:
            return
        if self._shadow is not None:
            self._service.shadow(self.model, self._shadow, self._prompt_ids, finished)
        if self._capture_samples:
            self._service.capture(self.model, self._capture_samples, self._prompt_text + finished.text)

    async def events(self) -> AsyncIterator[Piece | Finished]:
        try:
            async for event in self._generation.events():
                yield event
        except SlimServeError:
            raise
        except Exception as exc:
            raise InvalidContent(f"the generation failed: {str(exc).splitlines()[0][:300] if str(exc) else exc}") \
                from None
        finally:
            self._generation.cancel()  # a no-op once finished; stops the thread when the client went away

    async def collect(self, disconnected: Disconnected | None = None) -> Finished:
        """The whole answer; stops generating when `disconnected` says the client has gone."""
        watcher = asyncio.create_task(_watch(disconnected, self._generation)) if disconnected else None
        try:
            async for event in self.events():
                if isinstance(event, Finished):
                    return event
        finally:
            if watcher is not None:
                watcher.cancel()
        raise InvalidContent("the generation ended without an answer")


async def _watch(disconnected: Disconnected | None, generation: Generation) -> None:
    assert disconnected is not None
    while generation.running:
        if await disconnected():
            generation.cancel()
            return
        await asyncio.sleep(0.05)


class GenerationService:
    def __init__(self, *, catalog: Catalog, store: ArtifactStore, metrics: Metrics, max_generations: int,
                 threads: int, shadows: ShadowTraffic | None = None, capture: TrafficCapture | None = None) -> None:
        self._catalog = catalog
        self._store = store
        self._metrics = metrics
        self._max_generations = max_generations
        self._threads = threads or os.cpu_count() or 1
        self._shadows = shadows
        self._capture = capture
        self._models: dict[str, GenerationModel] = {}
        self._open_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._active: dict[str, int] = {}
        self._templates: dict[tuple[str, str, str], ChatTemplate] = {}

    async def serves(self, name: str) -> bool:
        """Whether `name` is a generation model (a transport that carries both kinds asks this first)."""
        return (await self._catalog.get(name)).generation is not None

    async def entry(self, name: str) -> ModelEntry:
        entry = await self._catalog.get(name)
        if entry.generation is None:
            task = (entry.text or {}).get("task")
            raise InvalidContent(f"model '{name}' does not generate text" + (f" (its task is {task})" if task else "")
                                 + "; generation needs a causal LM uploaded as a Hugging Face folder",
                                 code="not_a_generation_model")
        return entry

    async def start(self, *, name: str, variant: str | None, prompt: Prompt, params: SamplingParams,
                    protocol: str, request_id: str | None = None) -> Running:
        started = time.perf_counter()
        try:
            entry = await self.entry(name)
            if variant is not None and variant not in entry.variants:
                raise VariantNotFound(name, variant)
            chosen, shadow = (variant, None) if variant is not None else choose(entry, request_id)
            text = self._prompt_text(entry, prompt)
            model = await self.load(entry, chosen)
            prompt_ids = await asyncio.to_thread(model.encode, text)
            max_tokens = self._max_tokens(model, prompt_ids, params)
            active = self._active.get(name, 0)
            if active >= self._max_generations:
                raise Overloaded(f"model '{name}' already runs {active} generations (SLIMSERVE_MAX_GENERATIONS="
                                 f"{self._max_generations}); retry shortly")
        except SlimServeError as exc:
            self.failed(name, variant or "", protocol, exc.status_code, started)
            raise
        self._active[name] = active + 1
        self._metrics.active_generations.labels(name).set(self._active[name])
        return Running(self, entry, chosen, shadow, model, text, prompt_ids, params, max_tokens, protocol, started)

    def release(self, name: str) -> None:
        self._active[name] = max(self._active.get(name, 1) - 1, 0)
        self._metrics.active_generations.labels(name).set(self._active[name])

    def active(self, name: str) -> int:
        return self._active.get(name, 0)

    def _prompt_text(self, entry: ModelEntry, prompt: Prompt) -> str:
        assert entry.generation is not None
        if prompt.messages is None:
            if not isinstance(prompt.text, str):
                raise InvalidInput("the prompt must be a string")
            return prompt.text
        source = entry.generation.get("chat_template")
        if not source:
            raise InvalidInput(f"model '{entry.name}' has no chat template (its folder has no chat_template.jinja "
                               "and its tokenizer_config.json no 'chat_template'): use /v1/completions with a "
                               "prompt", code="no_chat_template")
        key = (source, entry.generation.get("bos_token") or "", entry.generation.get("eos_token") or "")
        template = self._templates.get(key)
        if template is None:  # compiling a template costs more than rendering it: once per model
            template = self._templates[key] = ChatTemplate(*key)
        return template.render(check_messages(prompt.messages))

    @staticmethod
    def _max_tokens(model: GenerationModel, prompt_ids: list[int], params: SamplingParams) -> int:
        context, used = model.context_length, len(prompt_ids)
        if used == 0:
            raise InvalidInput("the prompt is empty: it encodes to no tokens")
        if used >= context:
            raise InvalidInput(f"the prompt has {used} tokens; the model's context is {context} tokens, which "
                               "leaves no room to generate", code="prompt_too_long")
        if params.max_tokens is None:
            return context - used
        if used + params.max_tokens > context:
            raise InvalidInput(f"'max_tokens' is {params.max_tokens}, past the context: the prompt has {used} "
                               f"tokens and the context is {context}, so at most {context - used} can be generated",
                               code="max_tokens_past_context")
        return params.max_tokens

    async def load(self, entry: ModelEntry, variant: str) -> GenerationModel:
        target = entry.variants.get(variant)
        if target is None:
            raise VariantNotFound(entry.name, variant)
        loaded = self._models.get(target.sha256)
        if loaded is None:
            loaded = await asyncio.to_thread(self._open, target.sha256)
        return loaded

    def _open(self, sha256: str) -> GenerationModel:
        with self._guard:
            lock = self._open_locks.setdefault(sha256, threading.Lock())
        with lock:
            loaded = self._models.get(sha256)
            if loaded is None:
                started = time.perf_counter()
                folder = self._store.model(sha256).parent
                loaded = self._models[sha256] = GenerationModel(folder, threads=self._threads)
                log.info("loaded generation model %s in %.0f ms", sha256[:12], (time.perf_counter() - started) * 1e3)
        return loaded

    def forget(self, sha256s: list[str]) -> None:
        for sha in sha256s:
            self._models.pop(sha, None)

    def finished(self, running: Running, event: Finished, protocol: str, started: float) -> None:
        self._metrics.observe_generation(model=running.model, variant=running.variant,
                                         prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                                         first_token_s=event.first_token_seconds, decode_s=event.decode_seconds)
        total = time.perf_counter() - started
        if event.reason == CANCELLED:  # the client closed the request (nginx's 499)
            self._metrics.observe_failure(model=running.model, variant=running.variant, protocol=protocol,
                                          code=CLIENT_CLOSED, total_s=total)
            return
        self._metrics.observe_success(model=running.model, variant=running.variant, protocol=protocol, total_s=total,
                                      queue_s=0.0, infer_s=total)

    def failed(self, model: str, variant: str, protocol: str, code: int, started: float) -> None:
        self._metrics.observe_failure(model=model, variant=variant, protocol=protocol, code=code,
                                      total_s=time.perf_counter() - started)

    def capture(self, model: str, samples: int, conversation: str) -> None:
        """Keep the rendered prompt and its answer in the model's traffic sample: the text real users send, for
        calibrating and measuring variants (the dataset `traffic`, as for tensor models)."""
        if self._capture is not None:
            self._capture.offer(model, samples, {TEXT: np.array(conversation, dtype=str)}, 1, batched=False)

    def shadow(self, model: str, variant: str, prompt_ids: list[int], answer: Finished) -> None:
        """Score the answered tokens with the shadow variant (teacher-forced greedy agreement), after the answer."""
        if self._shadows is None or not answer.token_ids:
            return

        async def run() -> tuple[int, int, float]:
            entry = await self._catalog.get(model)
            shadow_model = await self.load(entry, variant)
            began = time.perf_counter()
            matches = await asyncio.to_thread(shadow_model.agreement, prompt_ids, answer.token_ids)
            return matches, len(answer.token_ids), time.perf_counter() - began

        self._shadows.submit_generation(model=model, variant=variant, run=run,
                                        primary_seconds=(answer.first_token_seconds or 0.0) + answer.decode_seconds)
