"""What an LLM variant costs against its original, on the same texts and machine.

Fidelity, teacher-forced on held-out text (every position of every sequence): perplexity of both, the share of
positions where both pick the same greedy next token, and the mean KL divergence of the variant's next-token
distribution from the original's. Speed, from onnxruntime-genai's own generation loop (what the server runs):
time to first token for a 128-token prompt, and decode tokens per second after it, both models timed in
alternation so that load on the machine falls on both alike.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.compression.llm.forward import DecoderSession

PROMPT_TOKENS = 128
DECODE_TOKENS = 64
SPEED_ROUNDS = 3


@dataclass
class _Sums:
    nll: float = 0.0
    positions: int = 0
    agreement: int = 0
    kl: float = 0.0


@dataclass
class TextScores:
    """Fidelity of several candidates, each against the one original, accumulated sequence by sequence."""

    original: _Sums = field(default_factory=_Sums)
    candidates: dict[str, _Sums] = field(default_factory=dict)

    def report(self, name: str) -> dict[str, Any]:
        mine = self.candidates[name]
        count = max(mine.positions, 1)
        return {"perplexity": round(math.exp(mine.nll / count), 4),
                "original_perplexity": round(math.exp(self.original.nll / max(self.original.positions, 1)), 4),
                "token_agreement": round(mine.agreement / count, 6), "kl_divergence": round(mine.kl / count, 6),
                "positions": mine.positions}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    result: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return result


def score(original: Path, candidates: dict[str, Path], sequences: list[list[int]], *,
          threads: int = 1) -> TextScores:
    """Teacher-forced fidelity of every candidate folder against the original folder on `sequences`."""
    reference = DecoderSession(original, threads=threads)
    sessions = {name: DecoderSession(folder, threads=threads) for name, folder in candidates.items()}
    scores = TextScores(candidates={name: _Sums() for name in candidates})
    for ids in sequences:
        if len(ids) < 2:
            continue
        targets = np.asarray(ids[1:])
        rows = np.arange(len(targets))
        base = _log_softmax(reference.logits(ids)[:-1])
        base_probs, base_top = np.exp(base), base.argmax(axis=-1)
        scores.original.nll -= float(base[rows, targets].sum())
        scores.original.positions += len(targets)
        for name, session in sessions.items():
            mine = _log_softmax(session.logits(ids)[:-1])
            sums = scores.candidates[name]
            sums.nll -= float(mine[rows, targets].sum())
            sums.positions += len(targets)
            sums.agreement += int((mine.argmax(axis=-1) == base_top).sum())
            sums.kl += float((base_probs * (base - mine)).sum())
    return scores


def speed(folders: dict[str, Path], prompt: list[int], *, threads: int) -> dict[str, dict[str, float]]:
    """Median time to first token (ms) and decode tokens/s of each folder, timed in alternation."""
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    import json

    import onnxruntime_genai as og

    models = {}
    for name, folder in folders.items():
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        models[name] = og.Model(config)
    prompt = (prompt * (PROMPT_TOKENS // max(len(prompt), 1) + 1))[:PROMPT_TOKENS]
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in folders}
    for round_index in range(SPEED_ROUNDS + 1):
        for name, model in models.items():
            first, rate = _generate_once(og, model, prompt)
            if round_index:  # the first round warms both up
                timings[name].append((first, rate))
    return {name: {"time_to_first_token_ms": round(statistics.median(t[0] for t in runs) * 1e3, 3),
                   "decode_tokens_per_second": round(statistics.median(t[1] for t in runs), 2)}
            for name, runs in timings.items()}


def _generate_once(og: Any, model: Any, prompt: list[int]) -> tuple[float, float]:
    params = og.GeneratorParams(model)
    total = len(prompt) + DECODE_TOKENS
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    generator.generate_next_token()
    first = time.perf_counter()
    produced = 1
    while not generator.is_done():
        generator.generate_next_token()
        produced += 1
    done = time.perf_counter()
    return first - started, (produced - 1) / max(done - first, 1e-9)
