"""Pruning: zero the smallest weights (unstructured) or remove whole neurons and channels (structured).

Unstructured pruning keeps every shape: on a CPU the zeros pay off only in compressed size. Structured pruning
really shrinks Conv output channels and Linear output neurons, and with them every tensor and constant that
depends on them (see `prune.deps` for the dependency analysis and what it refuses to touch). On transformers,
`prune.encoder` removes attention heads, FFN neurons and whole blocks (modes heads, ffn, layers; structured
with a dataset chooses among them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.compression import graph
from app.compression.config import PruneStep
from app.compression.context import StepContext
from app.compression.errors import UnsupportedModel
from app.compression.prune.encoder import is_transformer, run_encoder
from app.compression.prune.structured import run_structured
from app.compression.prune.unstructured import run_unstructured


def run(model: Path, output: Path, step: PruneStep, ctx: StepContext) -> dict[str, Any]:
    """Prune `model` into `output` (one self-contained ONNX file); returns notes for the report.

    Notes, both modes: mode, sparsity, parameters_before/after, nonzero_parameters_before/after, size_bytes,
    gzip_bytes, gzip_ratio, accuracy_before_recovery (top-1 on labelled ctx.train, else None).
    Unstructured adds achieved_sparsity, threshold, weights {total, nonzero} and per-weight layers.
    Structured adds importance, importance_detail, pruned (per group: layers with original/kept widths),
    skipped ({layer, op, weight, width, reason} per layer left untouched) and latency (or None).

    Raises:
        UnsupportedModel: nothing to prune (no constant Conv/Gemm/MatMul weight, or no layer that is safe to shrink).
        DataRequired: importance 'taylor' without a dataset.
        InvalidRecipe: importance 'taylor' on a model the gradient bridge cannot run.
    """
    if step.mode == "unstructured":
        return run_unstructured(model, output, step, ctx)
    if step.mode in ("heads", "ffn", "layers"):
        return run_encoder(model, output, step, ctx)
    if _encoder_pruning(model, step, ctx):
        try:
            return run_encoder(model, output, step, ctx)
        except UnsupportedModel as exc:
            if step.importance == "activation":
                raise
            # found at upload, refused once it ran (a per-head position bias, say): channels, as on any model
            return {**run_structured(model, output, step, ctx), "transformer_pruning": str(exc)}
    return run_structured(model, output, step, ctx)


def _encoder_pruning(model: Path, step: PruneStep, ctx: StepContext) -> bool:
    """`structured` on a transformer with real data removes heads, neurons and blocks; else channels."""
    if step.importance not in (None, "activation"):
        return False
    if ctx.train is None or ctx.train.source == "synthetic":
        if step.importance == "activation":
            return True  # run_encoder says why it needs a dataset
        return False
    return is_transformer(graph.load(model, weights=False))
