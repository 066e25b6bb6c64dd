"""The report: a variant measured against its original in one process, same data, same threads."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.compression import graph
from app.compression.config import Budget
from app.compression.data import ModelData

DEFAULT_BATCH_N = 32
_WARMUP_RUNS = 5
_MIN_RUNS = 30
MIN_TIMING_SECONDS = 0.4
_MAX_SECONDS = 4.0


# Outputs named like this are vectors to compare by direction, not class scores to compare by argmax.
FEATURE_NAMES = re.compile(r"embed|hidden|feature|pooled|encod|vector|latent|represent", re.IGNORECASE)


def is_classifier(outputs: np.ndarray, name: str = "") -> bool:
    """Logits or probabilities: one row of class scores per sample."""
    return outputs.ndim == 2 and outputs.shape[1] > 1 and outputs.dtype.kind == "f" and not FEATURE_NAMES.search(name)


def measure(
    original: Path, variant: Path, data: ModelData, *, budget: Budget | None = None, threads: int = 1,
    batch_n: int = DEFAULT_BATCH_N, progress: Callable[[float, str], None] | None = None,
    timing_seconds: float = MIN_TIMING_SECONDS,
) -> dict[str, Any]:
    """Size, latency and fidelity of `variant` beside `original`, on held-out `data`; each latency is timed for
    at least `timing_seconds` (and 30 calls of each model)."""
    report_progress = progress or (lambda _f, _s: None)
    sessions = graph.session(original, threads), graph.session(variant, threads)
    inputs, _ = graph.io_info(original)
    dynamic = all(t.dynamic_batch for t in inputs)
    report_progress(0.0, "measuring fidelity")
    fidelity = _fidelity(sessions, data, batch=batch_n if dynamic else 1)
    report_progress(0.4, "measuring latency")
    latency_original, latency_variant = _latency(sessions, data, dynamic, batch_n, timing_seconds)
    report_progress(0.9, "measuring size")
    size = _size(original), _size(variant)
    report = {
        "size_bytes": size[1]["size_bytes"],
        "size_ratio": round(size[1]["size_bytes"] / size[0]["size_bytes"], 4),
        "gzip_bytes": size[1]["gzip_bytes"],
        "parameters": size[1]["parameters"],
        "nonzero_parameters": size[1]["nonzero_parameters"],
        "latency_ms": latency_variant,
        "speedup": _speedup(latency_original, latency_variant),
        "fidelity": {**fidelity, "data": data.source},
        "within_budget": None,
        "original": {**size[0], "latency_ms": latency_original},
        "threads": threads,
        "session_config": graph.session_config(variant),
    }
    budget = budget or Budget(metric="agreement" if fidelity["agreement"] is not None else "cosine")
    report["budget"] = budget.model_dump()
    report["within_budget"] = within_budget(report, budget)
    report_progress(1.0, "measured")
    return report


def within_budget(report: dict[str, Any], budget: Budget) -> bool:
    fidelity = report["fidelity"]
    if budget.metric == "perplexity":
        increase = fidelity.get("perplexity_increase")
        return increase is not None and bool(increase <= budget.max_increase + 1e-9)
    if budget.metric == "accuracy":
        if fidelity["accuracy"] is None or fidelity["original_accuracy"] is None:
            return False
        drop = fidelity["original_accuracy"] - fidelity["accuracy"]
    elif budget.metric == "agreement":
        if fidelity["agreement"] is None:
            return False
        drop = 1.0 - fidelity["agreement"]
    else:
        drop = 1.0 - fidelity["cosine_mean"]
    return bool(drop <= budget.max_drop + 1e-9)


def _fidelity(sessions: tuple[ort.InferenceSession, ort.InferenceSession], data: ModelData,
              batch: int) -> dict[str, Any]:
    reference: list[np.ndarray] = []
    candidate: list[np.ndarray] = []
    for feeds in data.batches(batch):
        reference.append(sessions[0].run(None, feeds)[0])
        candidate.append(sessions[1].run(None, feeds)[0])
    original = np.concatenate(reference).astype(np.float64)
    variant = np.concatenate(candidate).astype(np.float64)
    flat_o = original.reshape(len(original), -1)
    flat_v = variant.reshape(len(variant), -1)
    norms = np.linalg.norm(flat_o, axis=1) * np.linalg.norm(flat_v, axis=1)
    dots = np.sum(flat_o * flat_v, axis=1)
    # Two all-zero outputs agree perfectly; one zero output against a non-zero one does not.
    cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(dots == 0, 1.0, 0.0))
    result: dict[str, Any] = {
        "samples": len(data),
        "agreement": None,
        "accuracy": None,
        "original_accuracy": None,
        "cosine_mean": round(float(np.mean(cosine)), 6),
        "cosine_min": round(float(np.min(cosine)), 6),
        "max_abs_error": float(np.max(np.abs(original - variant))) if original.size else 0.0,
        "relative_l2": float(np.linalg.norm(original - variant)) / max(float(np.linalg.norm(original)), 1e-12),
    }
    if is_classifier(original, sessions[0].get_outputs()[0].name):
        top_o, top_v = original.argmax(axis=1), variant.argmax(axis=1)
        result["agreement"] = round(float(np.mean(top_o == top_v)), 6)
        labels = data.labels
        if labels is not None and labels.ndim == 1 and labels.dtype.kind in "iu":
            result["accuracy"] = round(float(np.mean(top_v == labels)), 6)
            result["original_accuracy"] = round(float(np.mean(top_o == labels)), 6)
    return result


def _latency(sessions: tuple[ort.InferenceSession, ort.InferenceSession], data: ModelData, dynamic: bool,
             batch_n: int, seconds: float) -> tuple[dict[str, Any], dict[str, Any]]:
    one = next(data.take(1).batches(1))
    single = _time_pair(sessions, one, seconds)
    original: dict[str, Any] = {"batch_1": single[0], "batch_n": None}
    variant: dict[str, Any] = {"batch_1": single[1], "batch_n": None}
    rows = min(batch_n, len(data))
    if dynamic and rows > 1:
        many = next(data.take(rows).batches(rows))
        timed = _time_pair(sessions, many, seconds)
        original["batch_n"] = {"batch": rows, **timed[0]}
        variant["batch_n"] = {"batch": rows, **timed[1]}
    return original, variant


def _time_pair(sessions: tuple[ort.InferenceSession, ort.InferenceSession], feeds: dict[str, np.ndarray],
               seconds: float) -> tuple[dict[str, float], dict[str, float]]:
    """Alternate the two models call by call, so machine noise hits both alike."""
    for _ in range(_WARMUP_RUNS):
        for session in sessions:
            session.run(None, feeds)
    times: tuple[list[float], list[float]] = ([], [])
    started = time.perf_counter()
    while True:
        for index, session in enumerate(sessions):
            t0 = time.perf_counter()
            session.run(None, feeds)
            times[index].append((time.perf_counter() - t0) * 1e3)
        elapsed = time.perf_counter() - started
        enough = len(times[0]) >= _MIN_RUNS and elapsed >= seconds
        if enough or (elapsed >= _MAX_SECONDS and len(times[0]) >= 5):
            break
    return _percentiles(times[0]), _percentiles(times[1])


def _percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(values, 50)), 4), "p95": round(float(np.percentile(values, 95)), 4),
            "runs": len(values)}


def _speedup(original: dict[str, Any], variant: dict[str, Any]) -> dict[str, float | None]:
    result: dict[str, float | None] = {"batch_1": round(original["batch_1"]["p50"] / variant["batch_1"]["p50"], 3)}
    if original["batch_n"] is not None and variant["batch_n"] is not None:
        result["batch_n"] = round(original["batch_n"]["p50"] / variant["batch_n"]["p50"], 3)
    else:
        result["batch_n"] = None
    return result


def renamed(report: dict[str, Any], variant: Path) -> None:
    """Refresh the sizes of `report` for `variant` written again under another name: the graph file names its
    external data file, so its size follows the name (by a few bytes; the weights are the same)."""
    report["size_bytes"] = graph.model_bytes(variant)
    report["size_ratio"] = round(report["size_bytes"] / report["original"]["size_bytes"], 4)


def _size(path: Path) -> dict[str, int]:
    total, nonzero = graph.count_parameters(graph.load(path))
    return {"size_bytes": graph.model_bytes(path), "gzip_bytes": graph.gzip_bytes(path),
            "parameters": total, "nonzero_parameters": nonzero}
