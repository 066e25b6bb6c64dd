"""Measurements a step makes on its own candidates: fidelity against its input model, and latency."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from app.compression import data as model_data
from app.compression import graph
from app.compression.context import StepContext
from app.compression.data import ModelData
from app.compression.errors import DataRequired
from app.compression.evaluate import is_classifier

MEASURE_SAMPLES = 256
_BATCH = 64


@dataclass(frozen=True)
class Fidelity:
    """A candidate's first output beside the reference's, on the same samples."""

    cosine_mean: float
    cosine_min: float
    agreement: float | None
    """Top-1 agreement, for classifier outputs only (as the report judges them: `evaluate.is_classifier`)."""
    max_abs_error: float

    def score(self) -> tuple[float, float]:
        """Higher is better: top-1 agreement first (what a classifier's users see), then cosine."""
        return (self.agreement if self.agreement is not None else self.cosine_mean, self.cosine_mean)

    def meets(self, cosine: float, agreement: float) -> bool:
        return self.cosine_mean >= cosine and (self.agreement is None or self.agreement >= agreement)

    def as_dict(self) -> dict[str, Any]:
        return {"cosine_mean": round(self.cosine_mean, 6), "cosine_min": round(self.cosine_min, 6),
                "agreement": None if self.agreement is None else round(self.agreement, 6),
                "max_abs_error": float(f"{self.max_abs_error:.4g}")}


def fidelity_dict(fidelity: Fidelity | None) -> dict[str, Any] | None:
    return fidelity.as_dict() if fidelity is not None else None


def sample_data(model: Path, ctx: StepContext, samples: int = MEASURE_SAMPLES) -> ModelData | None:
    """The step's shaping samples, or generated ones when every input is float; None when neither exists."""
    if ctx.train is not None:
        return ctx.train.take(samples)
    try:
        return model_data.synthetic_for(model, seed=ctx.seed, samples=samples)
    except DataRequired:
        return None


def run_outputs(path: Path, data: ModelData, threads: int = 1) -> np.ndarray:
    """The first output over all samples, batched as the model's inputs allow."""
    session = graph.session(path, threads)
    inputs, _ = graph.io_info(path)
    batch = model_data.feeds_per_batch(inputs) or _BATCH
    parts = [np.asarray(session.run(None, feeds)[0]) for feeds in data.batches(batch)]
    return np.concatenate(parts)


def session_exposing(model: onnx.ModelProto, names: Sequence[str], threads: int = 1) -> ort.InferenceSession:
    """A session of a copy of `model` that also answers the intermediate tensors `names` (by name)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    present = {v.name for v in proto.graph.output}
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in present)
    return graph.session(proto.SerializeToString(), threads, quiet=True)


class Reference:
    """The input model's outputs on fixed samples, so candidates are compared on the same footing."""

    def __init__(self, model: Path, data: ModelData, threads: int = 1) -> None:
        self.data = data
        self.threads = threads
        self.outputs = run_outputs(model, data, threads).astype(np.float64)
        # An embedding's argmax means nothing: the report judges outputs by name and shape, and so do we.
        self.classifier = is_classifier(self.outputs, graph.io_info(model)[1][0].name)

    def measure(self, candidate: Path) -> Fidelity:
        got = run_outputs(candidate, self.data, self.threads).astype(np.float64)
        return compare(self.outputs, got, self.classifier)


def compare(reference: np.ndarray, candidate: np.ndarray, classifier: bool) -> Fidelity:
    """Per-sample cosine and top-1 agreement, defined as in the report (`evaluate`)."""
    flat_r = reference.reshape(len(reference), -1)
    flat_c = candidate.reshape(len(candidate), -1)
    norms = np.linalg.norm(flat_r, axis=1) * np.linalg.norm(flat_c, axis=1)
    dots = np.sum(flat_r * flat_c, axis=1)
    # Two all-zero outputs agree perfectly; one zero output against a non-zero one does not.
    cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(dots == 0, 1.0, 0.0))
    agreement = None
    if classifier:
        agreement = float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1)))
    error = np.abs(reference - candidate)
    return Fidelity(float(np.mean(cosine)), float(np.min(cosine)), agreement,
                    float(np.max(error)) if error.size else 0.0)


def latency(paths: list[Path], feeds: dict[str, np.ndarray], threads: int = 1, runs: int = 25,
            max_seconds: float = 3.0) -> list[dict[str, float]]:
    """Median and p90 milliseconds per call for each model, alternating models call by call against drift.

    Sessions use onnxruntime's default (all) optimizations, as the server does.
    """
    sessions = [graph.session(p, threads) for p in paths]
    for _ in range(3):
        for session in sessions:
            session.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    started = time.perf_counter()
    while len(times[0]) < runs and (time.perf_counter() - started < max_seconds or len(times[0]) < 5):
        for index, session in enumerate(sessions):
            t0 = time.perf_counter()
            session.run(None, feeds)
            times[index].append((time.perf_counter() - t0) * 1e3)
    return [{"p50": round(float(np.median(t)), 4), "p90": round(float(np.percentile(t, 90)), 4), "runs": len(t)}
            for t in times]


def size_notes(source: Path, result: Path) -> dict[str, Any]:
    before, after = graph.model_bytes(source), graph.model_bytes(result)
    return {"size_bytes": {"input": before, "output": after}, "size_ratio": round(after / before, 4)}
