"""Structured pruning: whole output channels and neurons removed, with every tensor that depends on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from app.compression import graph
from app.compression.config import PruneStep
from app.compression.context import StepContext
from app.compression.data import ModelData
from app.compression.errors import DataRequired, UnsupportedModel
from app.compression.prune.apply import (
    Group,
    choose,
    groups,
    inferred_shapes,
    keep_count,
    lift_constants,
    refresh_shapes,
    rewrite,
)
from app.compression.prune.deps import Analysis
from app.compression.prune.importance import TAYLOR_SAMPLES, norms, taylor
from app.compression.prune.report import accuracy_notes, latency_notes, parameter_notes, size_notes
from app.compression.prune.reshape import analyze


def shrinkable(model: onnx.ModelProto) -> tuple[int, str]:
    """(layers structured pruning may shrink, why the others stay as they are), from the dependency analysis
    alone: the server asks this at upload, so a recipe that cannot shrink anything is refused at submission."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    lift_constants(proto)
    analysis = analyze(proto, inferred_shapes(proto))
    found = groups(analysis)
    free = [g for g in found if not g.reasons and len(g.classes) > 1]
    reasons = "; ".join(dict.fromkeys(r for g in found for r in g.reasons[:1]))
    if not analysis.producers:
        reasons = "no Conv, Gemm or MatMul with a constant weight and more than one output channel"
    return sum(len(g.producers) for g in free), reasons[:600]


def run_structured(model: Path, output: Path, step: PruneStep, ctx: StepContext) -> dict[str, Any]:
    importance = step.importance or "l2"
    if importance == "taylor" and (ctx.train is None or ctx.train.source == "synthetic"):
        raise DataRequired("importance 'taylor' ranks channels by their effect on the loss over real samples: "
                           "upload a dataset for this model, or use importance 'l1' or 'l2'")
    ctx.progress(0.0, "analysing channel dependencies")
    proto = graph.load(model)
    parameters_before = graph.count_parameters(proto)
    lift_constants(proto)
    analysis = analyze(proto, inferred_shapes(proto))
    if not analysis.producers:
        raise UnsupportedModel("structured pruning found no Conv, Gemm or MatMul with a constant weight "
                               "(and more than one output channel) to shrink")
    found = groups(analysis)
    prunable = [g for g in found
                if not g.reasons and keep_count(len(g.classes), step.sparsity) < len(g.classes)]
    skipped = [entry for g in found if g not in prunable for entry in _skipped(analysis, g, step.sparsity)]
    if not prunable:
        reasons = "; ".join(dict.fromkeys(entry["reason"] for entry in skipped))
        raise UnsupportedModel(f"structured pruning found no layer it can safely shrink: {reasons[:600]}")
    ctx.progress(0.1, "ranking channels")
    scores = _scores(proto, analysis, prunable, importance, ctx)
    roots = analysis.roots()
    removed = np.concatenate([choose(analysis, roots, g, scores, step.sparsity) for g in prunable])
    ctx.progress(0.75, "removing channels")
    changed = rewrite(proto, analysis, roots, removed)
    proto = refresh_shapes(proto, changed)
    graph.save(proto, output)
    ctx.progress(0.8, "checking the result")
    graph.check_step_output(model, output, "prune")
    roots_removed = np.isin(roots, removed)
    notes: dict[str, Any] = {
        "mode": "structured", "sparsity": step.sparsity, "importance": importance,
        "importance_detail": _importance_detail(importance, ctx.train),
        "pruned": [_pruned(analysis, g, roots_removed, importance) for g in prunable],
        "skipped": skipped,
        **parameter_notes(parameters_before, graph.count_parameters(proto)),
        **size_notes(model, output),
    }
    ctx.progress(0.85, "measuring")
    notes["latency"] = latency_notes(model, output, ctx)
    notes["accuracy_before_recovery"] = accuracy_notes(model, output, ctx)
    ctx.progress(1.0, "done")
    return notes


def _scores(proto: onnx.ModelProto, analysis: Analysis, prunable: list[Group], importance: str,
             ctx: StepContext) -> list[np.ndarray]:
    """Importance of every output channel of the layers in `prunable` (other layers get empty scores)."""
    wanted = sorted(i for g in prunable for i in g.producers)
    members = [analysis.producers[i] for i in wanted]
    if importance == "taylor":
        assert ctx.train is not None
        values = taylor(proto, members, ctx.train, lambda f, d: ctx.progress(0.1 + 0.6 * f, d))
    else:
        tensors = {t.name: t for t in proto.graph.initializer}
        weights = {p.weight: numpy_helper.to_array(tensors[p.weight]) for p in members}
        values = norms(members, weights, importance)
    scores = [np.zeros(0) for _ in analysis.producers]
    for index, value in zip(wanted, values, strict=True):
        scores[index] = value
    return scores


def _pruned(analysis: Analysis, group: Group, removed: np.ndarray, importance: str) -> dict[str, Any]:
    layers = []
    for index in group.producers:
        producer = analysis.producers[index]
        atoms = producer.layout.atoms
        layers.append({"layer": producer.label, "op": producer.op, "weight": producer.weight,
                       "original": len(atoms), "kept": int(np.count_nonzero(~removed[atoms]))})
    kept = int(np.count_nonzero(~removed[group.classes]))
    return {"layers": layers, "original": len(group.classes), "kept": kept, "importance": importance}


def _skipped(analysis: Analysis, group: Group, sparsity: float) -> list[dict[str, Any]]:
    reason = "; ".join(group.reasons[:3]) or \
        f"too narrow: {len(group.classes)} channel(s) keep {keep_count(len(group.classes), sparsity)} at this sparsity"
    return [{"layer": p.label, "op": p.op, "weight": p.weight, "width": len(p.layout.atoms), "reason": reason}
            for p in (analysis.producers[i] for i in group.producers)]


def _importance_detail(importance: str, train: ModelData | None) -> str:
    if importance == "taylor":
        samples = min(len(train), TAYLOR_SAMPLES) if train is not None else 0
        return (f"first-order Taylor |activation x gradient| per sample over {samples} samples "
                "(cross-entropy for a classifier, half the squared output norm otherwise); "
                "tied layers' scores divided by their mean, then summed")
    norm = "L1" if importance == "l1" else "L2"
    return f"{norm} norm of each output channel's weights; tied layers' scores divided by their mean, then summed"
