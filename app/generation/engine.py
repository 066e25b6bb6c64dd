"""Text generation with onnxruntime-genai: one loaded model per variant, one generator per request.

Why one generator per request, each on its own thread, and not onnxruntime-genai's `Engine`: on CPU (0.18) the
Engine batches statically. A request that arrives while another generates waits until that one has finished
(measured: a 5-token request behind a 100-token one got its first token after 101 steps), and its
continuous batching needs the paged KV cache, which the builder writes for CUDA only. Independent generators
share the loaded weights, start at once, and run in parallel on the cores (onnxruntime releases the GIL).

Each generator's KV cache is allocated for its own prompt plus `max_tokens` (`max_length`), never for the
model's whole context. A cancelled request (a client that went away) stops at the next token.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from app.generation.sampling import SamplingParams
from app.generation.text import IncrementalDecoder, StopText

STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"


def _genai() -> Any:
    # Telemetry off before the library loads: it reads the variable once, at import.
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    import onnxruntime_genai as og

    return og


@dataclass(slots=True)
class Piece:
    """Text decoded since the last piece (stop strings held back until they cannot match)."""

    text: str
    tokens: int


@dataclass(slots=True)
class Finished:
    reason: str
    prompt_tokens: int
    completion_tokens: int
    text: str
    token_ids: list[int]
    first_token_seconds: float | None
    """From the start of the request to its first token (the prompt's prefill included)."""
    decode_seconds: float
    """From the first token to the last."""


class GenerationModel:
    """A genai folder loaded once: weights, tokenizer and config shared by every generation of the variant."""

    def __init__(self, folder: Path, *, threads: int) -> None:
        og = _genai()
        self._og = og
        config = og.Config(str(folder))
        # Concurrent generators share the cores: a spinning thread would take one from another generation.
        options: dict[str, Any] = {"intra_op_num_threads": threads, "session.intra_op.allow_spinning": "0"}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self._model = og.Model(config)
        # Texts are encoded and decoded with the folder's tokenizer.json by `tokenizers`, as transformers does.
        self._tokens = Tokenizer.from_file(str(folder / "tokenizer.json"))
        model = json.loads((folder / "genai_config.json").read_text())["model"]
        self.context_length = int(model["context_length"])
        eos = model.get("eos_token_id")
        self.eos_ids = {int(t) for t in (eos if isinstance(eos, list) else [eos])}

    def encode(self, text: str) -> list[int]:
        return list(self._tokens.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tokens.decode(ids, skip_special_tokens=True))

    def generate(self, prompt: list[int], params: SamplingParams, max_tokens: int, *, started: float,
                 emit: Callable[[Piece | Finished], None], cancelled: threading.Event) -> Finished:
        """Run one generation to its end on the calling thread, handing pieces and the end to `emit`."""
        og = self._og
        search: dict[str, Any] = {"max_length": len(prompt) + max_tokens, "do_sample": not params.greedy}
        if not params.greedy:
            search.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0)
            if params.seed is not None:
                search["random_seed"] = params.seed
        generator_params = og.GeneratorParams(self._model)
        generator_params.set_search_options(**search)
        generator = og.Generator(self._model, generator_params)
        decoder = IncrementalDecoder(self._tokens)
        text = StopText(params.stop)
        ids: list[int] = []
        first: float | None = None
        reason, stopped = LENGTH, False
        generator.append_tokens(np.asarray(prompt, dtype=np.int32))
        while not generator.is_done() and not cancelled.is_set():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if first is None:
                first = time.perf_counter()
            if token in self.eos_ids:
                reason = STOP
                break
            ids.append(token)
            ready, stopped = text.add(decoder.add(token))
            if ready:
                emit(Piece(ready, len(ids)))
            if stopped:
                reason = STOP
                break
        if cancelled.is_set():
            reason = CANCELLED
        rest = ""
        if not stopped:  # the last characters, and a stop string they may still complete
            rest, stopped = text.add(decoder.flush())
            rest += "" if stopped else text.flush()
            reason = STOP if stopped else reason
        if rest:
            emit(Piece(rest, len(ids)))
        done = time.perf_counter()
        finished = Finished(reason, len(prompt), len(ids), text.emitted, ids,
                            None if first is None else first - started, 0.0 if first is None else done - first)
        emit(finished)
        return finished


    def agreement(self, prompt: list[int], answer: list[int]) -> int:
        """How many of `answer`'s tokens this model's greedy choice gives, each after the prompt and the answer
        so far (teacher-forced: one decode step per token, no sampling)."""
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=len(prompt) + len(answer) + 1, do_sample=False)
        generator = self._og.Generator(self._model, params)
        generator.append_tokens(np.asarray(prompt, dtype=np.int32))
        matches = 0
        for token in answer:
            matches += int(np.argmax(generator.get_logits().reshape(-1))) == token
            generator.append_tokens(np.asarray([token], dtype=np.int32))
        return matches


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop closed (the server stopped) while this generation ran: nobody is waiting
        pass


class Generation:
    """One running generation seen from the event loop: an async iterator of pieces, ending with Finished."""

    def __init__(self, model: GenerationModel, prompt: list[int], params: SamplingParams, max_tokens: int,
                 started: float, on_done: Callable[[Finished | None], None]) -> None:
        """Starts at once; `on_done` runs on the event loop when the thread has ended (its KV cache freed), with
        how the generation ended (None: it failed), whether or not anybody still reads the events."""
        self._queue: asyncio.Queue[Piece | Finished | BaseException] = asyncio.Queue()
        self._cancelled = threading.Event()
        loop = asyncio.get_running_loop()

        def emit(event: Piece | Finished | BaseException) -> None:
            _call_soon(loop, self._queue.put_nowait, event)

        def run() -> None:
            finished = None
            try:
                finished = model.generate(prompt, params, max_tokens, started=started, emit=emit,
                                          cancelled=self._cancelled)
            except BaseException as exc:  # handed to the request, which answers it; the thread ends cleanly
                emit(exc)
            finally:
                _call_soon(loop, on_done, finished)

        self._thread = threading.Thread(target=run, name="generate", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    async def events(self) -> AsyncIterator[Piece | Finished]:
        while True:
            event = await self._queue.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Finished):
                return
