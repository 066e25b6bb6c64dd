"""Unstructured pruning: the smallest weights over every layer zeroed by one global magnitude threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from app.compression import graph
from app.compression.config import PruneStep
from app.compression.context import StepContext
from app.compression.errors import UnsupportedModel
from app.compression.prune.report import accuracy_notes, parameter_notes, size_notes

# Inputs of each op that hold weights for unstructured pruning (biases and normalization parameters never do).
_WEIGHT_INPUTS = {"Conv": (1,), "Gemm": (0, 1), "MatMul": (0, 1), "ConvTranspose": (1,),
                  # onnxruntime's fusions keep their weights in the same places
                  "com.microsoft.Attention": (1,), "com.microsoft.FusedConv": (1,), "com.microsoft.FusedGemm": (0, 1),
                  "com.microsoft.FusedMatMul": (0, 1)}


_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)


def _weight_tensors(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Constant float weights (rank >= 2) of Conv/Gemm/MatMul -> the nodes that use them."""
    overridable = {v.name for v in model.graph.input}
    candidates = {t.name: t for t in model.graph.initializer
                  if t.name not in overridable and t.data_type in _FLOAT_TYPES and len(t.dims) >= 2}
    found: dict[str, list[str]] = {}
    for index, node in enumerate(model.graph.node):
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        for position in _WEIGHT_INPUTS.get(key, ()):
            if position < len(node.input) and node.input[position] in candidates:
                found.setdefault(node.input[position], []).append(node.name or f"{node.op_type}_{index}")
    return found


def run_unstructured(model: Path, output: Path, step: PruneStep, ctx: StepContext) -> dict[str, Any]:
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
        **parameter_notes(parameters_before, parameters_after),
        **size_notes(model, output),
        "note": "zeroed weights keep their shapes: a dense CPU kernel runs no faster, only the gzip size shrinks",
    }
    ctx.progress(0.8, "measuring accuracy")
    notes["accuracy_before_recovery"] = accuracy_notes(model, output, ctx)
    ctx.progress(1.0, "done")
    return notes
