"""Notes both pruning modes report: parameters, sizes, accuracy before recovery, latency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.compression import data as model_data
from app.compression import graph
from app.compression.context import StepContext
from app.compression.errors import CompressionError, DataRequired, InvalidRecipe
from app.compression.prune.importance import latency, top1_accuracy

ACCURACY_SAMPLES = 2048


def parameter_notes(before: tuple[int, int], after: tuple[int, int]) -> dict[str, Any]:
    return {"parameters_before": before[0], "parameters_after": after[0],
            "nonzero_parameters_before": before[1], "nonzero_parameters_after": after[1]}


def size_notes(model: Path, output: Path) -> dict[str, Any]:
    gzip_before, gzip_after = graph.gzip_bytes(model), graph.gzip_bytes(output)
    return {"size_bytes": {"original": graph.model_bytes(model), "pruned": graph.model_bytes(output)},
            "gzip_bytes": {"original": gzip_before, "pruned": gzip_after},
            "gzip_ratio": round(gzip_after / gzip_before, 4)}


def accuracy_notes(model: Path, output: Path, ctx: StepContext) -> dict[str, Any] | None:
    """Top-1 on the labelled shaping data, before any recovery training (None without labels)."""
    data = ctx.train.take(ACCURACY_SAMPLES) if ctx.train is not None else None
    before = top1_accuracy(model, data, ctx.threads)
    if before is None or data is None:
        return None
    return {"original": before, "pruned": top1_accuracy(output, data, ctx.threads),
            "samples": len(data), "data": "the step's shaping data"}


def latency_notes(model: Path, output: Path, ctx: StepContext) -> dict[str, Any] | None:
    data = ctx.train
    if data is None:
        try:
            data = model_data.synthetic_for(model, seed=ctx.seed, samples=32)
        except (DataRequired, InvalidRecipe):
            return None  # integer inputs without a declared range: nothing meaningful to time on
    try:
        return latency(model, output, data, ctx.threads)
    except CompressionError:
        raise
    except Exception:  # a timing is a nicety; the model itself was already checked
        return None
