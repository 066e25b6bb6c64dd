"""Pruning: zero the smallest weights (unstructured) or remove whole neurons and channels (structured).

Unstructured pruning keeps every shape: on a CPU the zeros pay off only in compressed size. Structured pruning
really shrinks Conv output channels and Linear output neurons, and with them every tensor and constant that
depends on them (see `prune.deps` for the dependency analysis and what it refuses to touch).
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from app.compression import data as model_data
from app.compression import graph
from app.compression.config import PruneStep
from app.compression.context import StepContext
from app.compression.data import ModelData
from app.compression.errors import CompressionError, DataRequired, InvalidRecipe, UnsupportedModel
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
from app.compression.prune.importance import TAYLOR_SAMPLES, latency, norms, taylor, top1_accuracy
from app.compression.prune.reshape import analyze

# Inputs of each op that hold weights for unstructured pruning (biases and normalization parameters never do).
_WEIGHT_INPUTS = {"Conv": (1,), "Gemm": (0, 1), "MatMul": (0, 1)}
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
ACCURACY_SAMPLES = 2048


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
        return _unstructured(model, output, step, ctx)
    return _structured(model, output, step, ctx)


# -- unstructured ------------------------------------------------------------------------------------------------


def _weight_tensors(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Constant float weights (rank >= 2) of Conv/Gemm/MatMul -> the nodes that use them."""
    overridable = {v.name for v in model.graph.input}
    candidates = {t.name: t for t in model.graph.initializer
                  if t.name not in overridable and t.data_type in _FLOAT_TYPES and len(t.dims) >= 2}
    found: dict[str, list[str]] = {}
    for index, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        for position in _WEIGHT_INPUTS.get(node.op_type, ()):
            if position < len(node.input) and node.input[position] in candidates:
                found.setdefault(node.input[position], []).append(node.name or f"{node.op_type}_{index}")
    return found


def _unstructured(model: Path, output: Path, step: PruneStep, ctx: StepContext) -> dict[str, Any]:
    proto = graph.load(model)
    targets = _weight_tensors(proto)
    if not targets:
        raise UnsupportedModel("unstructured pruning found no constant weight of a Conv, Gemm or MatMul to prune "
                               "(weights computed at run time or quantized to integers are not pruned)")
    ctx.progress(0.1, "ranking weights")
    parameters_before = graph.count_parameters(proto)
    tensors = {t.name: t for t in proto.graph.initializer}
    arrays = {name: numpy_helper.to_array(tensors[name]) for name in targets}
    magnitudes = np.concatenate([np.abs(a.astype(np.float32)).ravel() for a in arrays.values()])
    count = int(round(step.sparsity * magnitudes.size))
    # One global threshold: exactly `count` of the smallest magnitudes over every layer go (ties broken by position).
    chosen = np.argpartition(magnitudes, count - 1)[:count] if count else np.zeros(0, dtype=np.int64)
    keep = np.ones(magnitudes.size, dtype=bool)
    keep[chosen] = False
    layers, offset = [], 0
    for name, array in arrays.items():
        mask = keep[offset:offset + array.size].reshape(array.shape)
        offset += array.size
        pruned = np.where(mask, array, np.zeros((), dtype=array.dtype)).astype(array.dtype)
        tensors[name].CopyFrom(numpy_helper.from_array(pruned, name))
        nonzero = int(np.count_nonzero(pruned))
        layers.append({"weight": name, "layers": targets[name], "parameters": int(array.size), "nonzero": nonzero,
                       "sparsity": round(1.0 - nonzero / array.size, 4)})
    ctx.progress(0.6, "saving")
    graph.save(proto, output)
    parameters_after = graph.count_parameters(proto)
    weights_nonzero = int(np.count_nonzero(keep & (magnitudes > 0)))
    notes: dict[str, Any] = {
        "mode": "unstructured", "sparsity": step.sparsity,
        "achieved_sparsity": round(1.0 - weights_nonzero / magnitudes.size, 4),
        "threshold": float(magnitudes[chosen].max()) if count else 0.0,
        "layers": layers,
        "weights": {"total": int(magnitudes.size), "nonzero": weights_nonzero},
        **_parameter_notes(parameters_before, parameters_after),
        **_size_notes(model, output),
        "note": "zeroed weights keep their shapes: a dense CPU kernel runs no faster, only the gzip size shrinks",
    }
    ctx.progress(0.8, "measuring accuracy")
    notes["accuracy_before_recovery"] = _accuracy_notes(model, output, ctx)
    ctx.progress(1.0, "done")
    return notes


# -- structured --------------------------------------------------------------------------------------------------


def _structured(model: Path, output: Path, step: PruneStep, ctx: StepContext) -> dict[str, Any]:
    if step.importance == "taylor" and (ctx.train is None or ctx.train.source == "synthetic"):
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
    scores = _scores(proto, analysis, prunable, step, ctx)
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
        "mode": "structured", "sparsity": step.sparsity, "importance": step.importance,
        "importance_detail": _importance_detail(step, ctx.train),
        "pruned": [_pruned(analysis, g, roots_removed, step.importance) for g in prunable],
        "skipped": skipped,
        **_parameter_notes(parameters_before, graph.count_parameters(proto)),
        **_size_notes(model, output),
    }
    ctx.progress(0.85, "measuring")
    notes["latency"] = _latency_notes(model, output, ctx)
    notes["accuracy_before_recovery"] = _accuracy_notes(model, output, ctx)
    ctx.progress(1.0, "done")
    return notes


def _scores(proto: onnx.ModelProto, analysis: Analysis, prunable: list[Group], step: PruneStep,
            ctx: StepContext) -> list[np.ndarray]:
    """Importance of every output channel of the layers in `prunable` (other layers get empty scores)."""
    wanted = sorted(i for g in prunable for i in g.producers)
    members = [analysis.producers[i] for i in wanted]
    if step.importance == "taylor":
        assert ctx.train is not None
        values = taylor(proto, members, ctx.train, lambda f, d: ctx.progress(0.1 + 0.6 * f, d))
    else:
        tensors = {t.name: t for t in proto.graph.initializer}
        weights = {p.weight: numpy_helper.to_array(tensors[p.weight]) for p in members}
        values = norms(members, weights, step.importance)
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


def _importance_detail(step: PruneStep, train: ModelData | None) -> str:
    if step.importance == "taylor":
        samples = min(len(train), TAYLOR_SAMPLES) if train is not None else 0
        return (f"first-order Taylor |activation x gradient| per sample over {samples} samples "
                "(cross-entropy for a classifier, half the squared output norm otherwise); "
                "tied layers' scores divided by their mean, then summed")
    norm = "L1" if step.importance == "l1" else "L2"
    return f"{norm} norm of each output channel's weights; tied layers' scores divided by their mean, then summed"


# -- notes shared by both modes ----------------------------------------------------------------------------------


def _parameter_notes(before: tuple[int, int], after: tuple[int, int]) -> dict[str, Any]:
    return {"parameters_before": before[0], "parameters_after": after[0],
            "nonzero_parameters_before": before[1], "nonzero_parameters_after": after[1]}


def _size_notes(model: Path, output: Path) -> dict[str, Any]:
    raw_before, raw_after = model.read_bytes(), output.read_bytes()
    gzip_before, gzip_after = (len(gzip.compress(raw, compresslevel=6)) for raw in (raw_before, raw_after))
    return {"size_bytes": {"original": len(raw_before), "pruned": len(raw_after)},
            "gzip_bytes": {"original": gzip_before, "pruned": gzip_after},
            "gzip_ratio": round(gzip_after / gzip_before, 4)}


def _accuracy_notes(model: Path, output: Path, ctx: StepContext) -> dict[str, Any] | None:
    """Top-1 on the labelled shaping data, before any recovery training (None without labels)."""
    data = ctx.train.take(ACCURACY_SAMPLES) if ctx.train is not None else None
    before = top1_accuracy(model, data, ctx.threads)
    if before is None or data is None:
        return None
    return {"original": before, "pruned": top1_accuracy(output, data, ctx.threads),
            "samples": len(data), "data": "the step's shaping data"}


def _latency_notes(model: Path, output: Path, ctx: StepContext) -> dict[str, Any] | None:
    data = ctx.train
    if data is None:
        try:
            data = model_data.synthetic(graph.io_info(model)[0], seed=ctx.seed, samples=32)
        except (DataRequired, InvalidRecipe):
            return None  # integer inputs without a declared range: nothing meaningful to time on
    try:
        return latency(model, output, data, ctx.threads)
    except CompressionError:
        raise
    except Exception:  # a timing is a nicety; the model itself was already checked
        return None
