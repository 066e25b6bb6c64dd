"""FP16: weights and compute in half precision where safe; the model's inputs and outputs keep their types."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
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
# Always float32: recurrent layers have no float16 kernel on CPU, and a BatchNormalization left unfused (as
# Paddle2ONNX writes them) computes var + epsilon in float16, where epsilon 1e-5 is subnormal (measured on
# PaddleOCR's detector: output cosine 0.84 with it in float16, 0.999998 without).
ALWAYS_FLOAT32 = {"LSTM", "GRU", "RNN", "BatchNormalization"}
CRASH_SUSPECTS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Slice", "Concat", "Gather")
_MISSING_KERNEL = re.compile(r"Could not find an implementation for (\w+)\(")
_MAX_KERNEL_RETRIES = 16


def run_fp16(model: Path, output: Path, step: QuantizeStep, ctx: StepContext) -> dict[str, Any]:
    source = graph.load(model)
    if not any(i.data_type == onnx.TensorProto.FLOAT for i in source.graph.initializer):
        raise UnsupportedModel("fp16 converts float32 weights, and this model has none")
    present = op_types(source)
    chosen = present - set(step.op_types) if step.op_types is not None else set()
    block = set(DEFAULT_OP_BLOCK_LIST) | ALWAYS_FLOAT32 | chosen
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
        _convert(model, target, block)
        crashed = graph.opens_safely(target)
        if crashed is not None and "crashed" in crashed:
            # onnxruntime's layout optimizer crashes on some float16 graphs (a Transpose before a float32 LSTM):
            # the shape ops nearest the trouble stay float32, one family at a time
            suspect = next((op for op in CRASH_SUSPECTS if op not in block and op in op_types(graph.load(model))),
                           None)
            if suspect is None:
                raise StepFailed(f"onnxruntime crashes opening the float16 model ({crashed}) whatever is kept in "
                                 "float32; use mode 'dynamic' or 'int4' for this model")
            block = block | {suspect}
            continue
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


def _convert(model: Path, target: Path, block: set[str]) -> None:
    """onnxruntime's converter, with what it gets wrong mended; raises StepFailed if the result is invalid.

    It trusts the model's recorded value_info, and a stale record (the dynamo exporter's, or shape inference's
    around a recurrent layer) makes it write a Cast of the wrong type; without the records it infers its own.
    """
    problem = ""
    for keep_records in (True, False):
        source = graph.load(model)
        if not keep_records:
            del source.graph.value_info[:]
        # Past 2 GB the converter's own shape inference cannot serialize the model: ours runs on the structure.
        large = graph.is_large(source)
        if large:
            source = graph.infer_shapes(source)
        converted = convert_float_to_float16(source, keep_io_types=True, op_block_list=sorted(block),
                                             disable_shape_infer=large)
        toposort(converted.graph)  # the converter appends its Cast nodes at the end of the graph
        _drop_dangling_casts(converted.graph)
        _halve_recurrent_weights(converted)
        graph.save(converted, target)
        try:
            onnx.checker.check_model(str(target), full_check=True)
            return
        except Exception as exc:  # the checker's ValidationError or shape inference's InferenceError
            problem = str(exc).splitlines()[0][:300]
    raise StepFailed(f"the float16 converter wrote an invalid model: {problem}")


def _halve_recurrent_weights(model: onnx.ModelProto) -> None:
    """Recurrent layers run in float32, but their weights may still be stored in float16 behind a Cast, which
    onnxruntime folds once at load: the file shrinks like the rest of the model."""
    initializers = {t.name: t for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    casts: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.op_type not in ("LSTM", "GRU", "RNN"):
            continue
        for position in (1, 2, 3):
            name = node.input[position] if len(node.input) > position else ""
            tensor = initializers.get(name)
            if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT or readers.get(name, 0) != 1:
                continue
            half = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor).astype(np.float16),
                                                f"{name}.float16")
            tensor.CopyFrom(half)
            casts.append(onnx.helper.make_node("Cast", [half.name], [name], name=f"{name}.to_float32",
                                               to=onnx.TensorProto.FLOAT))
    if casts:
        nodes = [*casts, *model.graph.node]
        del model.graph.node[:]
        model.graph.node.extend(nodes)


def _drop_dangling_casts(graph_proto: onnx.GraphProto) -> None:
    """The converter wraps every output of a blocked node in a Cast, also the optional outputs the node does not
    produce (an LSTM's unused Y_c): those Casts read nothing, and nothing reads them."""
    available = {i.name for i in graph_proto.input} | {t.name for t in graph_proto.initializer}
    available |= {o for n in graph_proto.node for o in n.output if o}
    read = {i for n in graph_proto.node for i in n.input} | {o.name for o in graph_proto.output}
    kept = [n for n in graph_proto.node if not (n.op_type == "Cast" and n.input[0] not in available
                                                 and not read & set(n.output))]
    del graph_proto.node[:]
    graph_proto.node.extend(kept)


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

