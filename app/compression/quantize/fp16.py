"""FP16: weights and compute in half precision where safe; the model's inputs and outputs keep their types."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from app.compression import graph
from app.compression.config import QuantizeStep
from app.compression.context import StepContext
from app.compression.errors import StepFailed, UnsupportedModel
from app.compression.graph import op_types, toposort
from app.compression.scoring import Fidelity, Reference, fidelity_dict, sample_data

# FP16 keeps ~3 significant digits: below these (against the input model) the next attempt blocks more ops.
MIN_COSINE = 0.999
MIN_AGREEMENT = 0.99
# Ops whose float16 results drift: long reductions, exponentials, normalizations.
SENSITIVE_OPS = {"Softmax", "LayerNormalization", "SkipLayerNormalization", "ReduceSum", "ReduceMean", "Exp", "Pow",
                 "Sqrt", "Erf", "Gelu", "BiasGelu", "FastGelu", "InstanceNormalization", "CumSum", "Log"}
_MISSING_KERNEL = re.compile(r"Could not find an implementation for (\w+)\(")
_MAX_KERNEL_RETRIES = 8


def run_fp16(model: Path, output: Path, step: QuantizeStep, ctx: StepContext) -> dict[str, Any]:
    source = graph.load(model)
    if not any(i.data_type == onnx.TensorProto.FLOAT for i in source.graph.initializer):
        raise UnsupportedModel("fp16 converts float32 weights, and this model has none")
    present = op_types(source)
    block = set(DEFAULT_OP_BLOCK_LIST) | (present - set(step.op_types) if step.op_types is not None else set())
    data = sample_data(model, ctx)
    reference = Reference(model, data, ctx.threads) if data is not None else None
    ctx.progress(0.1, "converting")
    attempts = [_attempt(model, ctx.workdir / "fp16-a.onnx", block, reference)]
    first_fidelity = attempts[0][2]
    if first_fidelity is not None and not first_fidelity.meets(MIN_COSINE, MIN_AGREEMENT) and present & SENSITIVE_OPS:
        ctx.progress(0.5, "converting with sensitive ops in float32")
        attempts.append(_attempt(model, ctx.workdir / "fp16-b.onnx", block | SENSITIVE_OPS, reference))
    path, blocked, fidelity = max(attempts, key=lambda a: a[2].score() if a[2] is not None else (0.0, 0.0))
    graph.save(graph.load(path), output)
    result = graph.load(output)
    return {
        "keep_io_types": True, "converter": "onnxruntime.transformers.float16",
        "op_types_kept_float32": sorted(blocked & present),
        "float16_initializers": sum(i.data_type == onnx.TensorProto.FLOAT16 for i in result.graph.initializer),
        "float32_initializers": sum(i.data_type == onnx.TensorProto.FLOAT for i in result.graph.initializer),
        "attempts": [{"op_types_kept_float32": sorted(b & present), "fidelity": fidelity_dict(f)}
                     for _, b, f in attempts],
        "fidelity": fidelity_dict(fidelity),
        "fidelity_data": None if data is None else {"source": data.source, "samples": len(data)},
        "cpu_runs_in_float32": sorted(_cpu_float32_ops(output, ctx.workdir)),
        "cpu_note": "onnxruntime's CPU provider has no float16 kernel for these ops; it casts around them at load "
                    "time, so on CPU fp16 halves the size but does not speed up inference",
    }


def _attempt(model: Path, target: Path, block: set[str], reference: Reference | None,
             ) -> tuple[Path, set[str], Fidelity | None]:
    """Convert, and block every op that CPU onnxruntime then refuses to open in float16."""
    for _ in range(_MAX_KERNEL_RETRIES):
        converted = convert_float_to_float16(graph.load(model), keep_io_types=True, op_block_list=sorted(block))
        toposort(converted.graph)  # the converter appends its Cast nodes at the end of the graph
        graph.save(converted, target)
        try:
            graph.session(target)
        except Exception as exc:  # onnxruntime raises its own exception types for a missing kernel
            missing = _MISSING_KERNEL.search(str(exc))
            if missing is None or missing.group(1) in block:
                raise StepFailed(f"the float16 model does not open in onnxruntime: {str(exc)[:300]}") from None
            block = block | {missing.group(1)}
            continue
        return target, block, reference.measure(target) if reference is not None else None
    raise StepFailed("fp16: too many ops without a float16 kernel; use mode 'dynamic' instead")


def _cpu_float32_ops(path: Path, workdir: Path) -> set[str]:
    """Op types onnxruntime's CPU provider wraps in float32 casts when it loads the model (informational)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.optimized_model_filepath = str(workdir / "fp16-as-loaded.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    loaded = graph.load(workdir / "fp16-as-loaded.onnx")
    casts = {o for n in loaded.graph.node if n.op_type == "Cast" and n.name.startswith("InsertedPrecisionFreeCast")
             and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute) for o in n.output}
    return {n.op_type for n in loaded.graph.node if n.op_type != "Cast" and casts & set(n.input)}

