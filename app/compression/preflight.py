"""What a recipe needs from a model, checked at submission instead of an hour into a job.

`profile` reads a model once (at upload or after its conversion) into a small JSON-able summary: its op types,
which layers hold constant weights (wherever the exporter put them), what the training bridge cannot run, and
the size at which generated inputs run it. `check` then answers, from the profile alone, why a recipe cannot
apply; the server keeps the profile with the model, so no replica needs the model file to refuse a request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from app.compression import data as model_data
from app.compression import graph
from app.compression.config import DistillStep, PruneStep, QuantizeStep, Recipe
from app.compression.distill.bridge import coverage
from app.compression.errors import CompressionError, DataRequired
from app.compression.normalize import lift_constants, resolve_identities
from app.compression.prune.apply import keep_count
from app.compression.prune.encoder import MIN_SAMPLES as ENCODER_MIN_SAMPLES
from app.compression.recipes import EVAL_FRACTION

PROFILE_VERSION = 2
# Which input holds the weight, per op type whose weights steps work on.
_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0, "LSTM": 1, "GRU": 1,
                 "com.microsoft.Attention": 1}
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


def profile(model: Path, runner: Any = None, load_weights: bool = True) -> dict[str, Any]:
    """The summary `check` needs; runs the model (on `runner`, an open session, if given) a few times to find
    a size for generated inputs. `load_weights=False` leaves external data on disk (a model of many GB is not read
    into memory for this): structured pruning is then not analysed."""
    proto = graph.load(model, weights=load_weights)
    lift_constants(proto)
    resolve_identities(proto)
    floats = {t.name for t in proto.graph.initializer if t.data_type in _FLOATS and len(t.dims) >= 2}
    weights: dict[str, int] = {}
    for node in proto.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        position = _WEIGHT_INPUT.get(key)
        if position is not None and len(node.input) > position and node.input[position] in floats:
            weights[key] = weights.get(key, 0) + 1
    try:
        synthetic: dict[str, Any] = {"size": model_data.plan_synthetic(model, runner=runner).size}
    except DataRequired as exc:
        synthetic = {"error": str(exc)}
    return {
        "version": PROFILE_VERSION,
        "ops": sorted({n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
                       for n in proto.graph.node}),
        "weights": dict(sorted(weights.items())),
        "float_weights": bool(floats),
        "family": graph.model_family(proto),
        "bridge_unsupported": coverage.unsupported(proto),
        "structured": _structured(proto) if load_weights or not _has_external_data(proto) else
        {"layers": None, "reason": "not analysed: the weights are in external data"},
        "transformer": _transformer(proto),
        "synthetic": synthetic,
    }


def _transformer(proto: onnx.ModelProto) -> dict[str, Any]:
    """How many encoder blocks head, neuron and block pruning found, or why it found none."""
    from app.compression.prune.transformer import find_blocks

    try:
        return {"blocks": len(find_blocks(proto)), "reason": None}
    except CompressionError as exc:
        return {"blocks": 0, "reason": str(exc)[:600]}
    except Exception as exc:  # an analysis bug must not stop an upload; the job would meet it and say so
        return {"blocks": None, "reason": f"not analysed ({type(exc).__name__})"}


def _has_external_data(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)


def _structured(proto: onnx.ModelProto) -> dict[str, Any]:
    from app.compression.prune.structured import shrinkable  # the analysis is pure onnx/numpy, no torch

    try:
        layers, reason = shrinkable(proto)
    except Exception as exc:  # an analysis bug must not stop an upload; the job would meet it and say so
        return {"layers": None, "reason": f"not analysed ({type(exc).__name__})"}
    return {"layers": layers, "reason": reason}


def check(summary: dict[str, Any], recipe: Recipe | None, has_dataset: bool,
          dataset_samples: int | None = None) -> list[str]:
    """Why `recipe` (None: `auto`) cannot apply to the profiled model, one reason per problem; empty if it can."""
    if summary.get("version") != PROFILE_VERSION:
        return []  # a profile from another version: the job's own checks decide
    problems: list[str] = []
    synthetic = summary.get("synthetic") or {}
    if not has_dataset and "error" in synthetic:
        problems.append(synthetic["error"])
    for index, step in enumerate(recipe.steps if recipe is not None else []):
        reason = _step_problem(summary, step, has_dataset, dataset_samples)
        if reason:
            problems.append(f"step {index + 1} ({step.op}): {reason}")
    return problems


def _step_problem(summary: dict[str, Any], step: Any, has_dataset: bool, samples: int | None) -> str | None:
    weights: dict[str, int] = summary.get("weights") or {}
    ops = ", ".join(summary.get("ops") or []) or "no operators"
    if isinstance(step, QuantizeStep):
        if step.qat is not None and not has_dataset:
            return ("quantization-aware training learns from the original's outputs on real inputs: upload a "
                    "dataset for this model first")
        if step.qat is not None and summary.get("bridge_unsupported"):
            return _bridge(summary)
        if step.mode == "fp16" and not summary.get("float_weights"):
            return "fp16 converts float32 weights, and this model has none"
        if step.mode == "int4" and not (weights.get("MatMul") or weights.get("Gemm") or (
                step.op_types and "Gather" in step.op_types and weights.get("Gather"))):
            return "int4 needs MatMul or Gemm layers with constant weights; this model has none"
        if step.mode in ("dynamic", "static") and not weights:
            return f"{step.mode} quantization finds no layer with constant weights; this model has {ops}"
        return None
    if isinstance(step, PruneStep):
        if not (weights.keys() & {"Conv", "Gemm", "MatMul", "ConvTranspose", "com.microsoft.Attention"}):
            return "pruning finds no Conv, Gemm or MatMul with constant weights in this model"
        transformer = summary.get("transformer") or {}
        if step.mode in ("heads", "ffn", "layers") or step.importance == "activation":
            if transformer.get("blocks") == 0:
                return f"pruning by {step.mode} needs a transformer whose attention can be identified: " \
                       f"{transformer.get('reason')}"
            if not has_dataset:
                return (f"pruning by {step.mode} ranks heads, neurons and blocks on real inputs: upload a dataset "
                        "for this model first")
            if samples is not None and _shaping(samples) < ENCODER_MIN_SAMPLES:
                return (f"the dataset has {samples} samples: pruning a transformer needs at least "
                        f"{_smallest_dataset()} ({EVAL_FRACTION:.0%} are held out to measure the variant; of the "
                        f"rest, some rank heads and neurons and {ENCODER_MIN_SAMPLES // 4} or more check the cut)")
            blocks = transformer.get("blocks")
            if step.mode == "layers" and blocks and keep_count(blocks, step.sparsity) == blocks:
                return f"sparsity {step.sparsity} drops none of the {blocks} blocks"
            return None
        structured = summary.get("structured") or {}
        if step.mode == "structured" and structured.get("layers") == 0:
            return f"structured pruning finds no layer it can safely shrink: {structured.get('reason')}"
        if step.importance == "taylor" and summary.get("bridge_unsupported"):
            return _bridge(summary)
        return None
    if isinstance(step, DistillStep) and summary.get("bridge_unsupported"):
        return _bridge(summary)
    return None


def _shaping(samples: int) -> int:
    """Samples left to shape the model once the held-out split is set aside (as `ModelData.split` does)."""
    return samples - min(max(int(round(samples * EVAL_FRACTION)), 1), samples - 1)


def _smallest_dataset() -> int:
    return next(n for n in range(2, 1000) if _shaping(n) >= ENCODER_MIN_SAMPLES)


def _bridge(summary: dict[str, Any]) -> str:
    missing = ", ".join(summary["bridge_unsupported"][:8])
    return (f"training runs the model through SlimServe's ONNX-to-torch bridge, which cannot run {missing}; "
            "use a recipe without distillation (quantize, unstructured prune)")


def describe(problems: list[str]) -> str:
    return "this recipe cannot apply to the model: " + "; ".join(problems)
