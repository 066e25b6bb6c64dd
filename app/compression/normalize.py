"""The first step of every recipe: the model as exporters write it, made into the form every later step expects.

Exporters disagree on the basics. Paddle2ONNX keeps every weight in a `Constant` node and writes no initializer;
tf2onnx and older exporters stay at opsets below 13, where per-channel QuantizeLinear/DequantizeLinear (the
`axis` attribute) does not exist; some graphs use contrib ops without declaring their domain, or list nodes out
of order. Normalization, on a copy (the uploaded file is never touched):

- lifts `Constant` tensors into initializers (as onnxruntime's and onnx's own tools do), so weights are found,
  quantized, pruned and trained wherever they came from; `Identity(initializer)` (the TorchScript exporter's
  way to share equal parameters) becomes an initializer; byte-identical small non-float constants (shapes,
  axes, scalars) written many times over become one;
- raises the default-domain opset to 13 when it is lower, with onnx's version converter;
- declares every opset domain its nodes use, sorts nodes topologically, and records inferred shapes;
- checks that the result computes what the original computes, and falls back one change at a time if not.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from app.compression import graph
from app.compression.data import ModelData
from app.compression.errors import StepFailed

MIN_OPSET = 13
# Constants up to this many elements may be merged when identical; weights are never merged (sharing a weight
# ties layers that pruning and per-channel quantization must treat separately).
_MERGE_MAX_ELEMENTS = 64
# Weights fed through Identity up to this size get a copy of their own; larger ones stay shared (tied tables).
_COPY_MAX_ELEMENTS = 1 << 16
_CHECK_SAMPLES = 8
_TOLERANCE = 1e-4  # relative to the output's largest magnitude: only float reordering may differ


def normalize(model: Path, output: Path, data: ModelData | None, threads: int = 1) -> dict[str, Any]:
    """Write the normalized form of `model` to `output`; returns notes saying what changed.

    Raises:
        StepFailed: even the lifted graph computes something else than the original (a bug, named).
    """
    proto = graph.load(model)
    notes: dict[str, Any] = {"constants_lifted": lift_constants(proto),
                             "identities_resolved": resolve_identities(proto),
                             "constants_merged": merge_duplicate_constants(proto)}
    declared = graph.declare_domains(proto)
    if declared:
        notes["domains_declared"] = declared
    graph.toposort(proto.graph)
    lifted = onnx.ModelProto()
    lifted.CopyFrom(proto)
    notes.update(_upgrade_opset(proto))
    notes["shape_inference"] = _infer_shapes(proto)
    feeds = _check_feeds(data)
    candidates: list[tuple[str, onnx.ModelProto | None]] = [("normalized", proto)]
    if notes.get("opset_upgraded"):
        candidates.append(("without the opset upgrade", lifted))
    candidates.append(("as uploaded", None))  # loaded only if needed: a model may be gigabytes
    reference = graph.session(model, threads).run(None, feeds) if feeds is not None else None
    for label, candidate in candidates:
        graph.save(graph.load(model) if candidate is None else candidate, output)
        problem = _differs(output, feeds, reference, threads)
        if problem is None:
            if label == "without the opset upgrade":
                notes["opset_upgrade_rejected"] = notes.pop("opset_upgraded")
            elif label == "as uploaded":
                notes = {"skipped": "every normalized form changed the outputs; the steps get the model as uploaded",
                         **{k: v for k, v in notes.items() if k.startswith("rejected_")}}
            notes["checked"] = "not checked: no inputs" if feeds is None else \
                f"outputs equal the original's on {len(next(iter(feeds.values())))} sample(s)"
            return notes
        notes[f"rejected_{label.replace(' ', '_')}"] = problem
    raise StepFailed(f"the model does not reproduce its own outputs ({notes.get('rejected_as_uploaded')}): "
                     "it computes something random, so no compressed variant can be compared with it")


def lift_constants(model: onnx.ModelProto) -> int:
    """Default-domain `Constant` nodes of the main graph become initializers; returns how many."""
    outputs = {v.name for v in model.graph.output}
    kept: list[onnx.NodeProto] = []
    lifted = 0
    for node in model.graph.node:
        tensor = _constant_tensor(node) if node.output and node.output[0] not in outputs else None
        if tensor is None:
            kept.append(node)
            continue
        tensor.name = node.output[0]
        model.graph.initializer.append(tensor)
        if model.ir_version < 4:  # before IR 4 every initializer must also be a graph input
            model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
        lifted += 1
    if lifted:
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return lifted


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attribute = node.attribute[0]
    if attribute.name == "value" and attribute.HasField("t"):
        tensor = TensorProto()
        tensor.CopyFrom(attribute.t)
        return tensor if tensor.data_location != TensorProto.EXTERNAL else None
    scalars = {"value_float": (np.float32, False), "value_floats": (np.float32, True),
               "value_int": (np.int64, False), "value_ints": (np.int64, True)}
    if attribute.name in scalars:
        dtype, is_list = scalars[attribute.name]
        value = helper.get_attribute_value(attribute)
        return numpy_helper.from_array(np.array(value if is_list else value, dtype=dtype))
    return None  # sparse and string constants stay nodes: nothing downstream needs them as initializers


def resolve_identities(model: onnx.ModelProto) -> int:
    """`Identity(initializer)` becomes an initializer of its own; returns how many.

    The TorchScript exporter deduplicates equal parameters (zero biases of a fresh layer, tied embeddings) by
    feeding one initializer through Identity nodes. Small ones are copied, so every layer owns its weights again
    (pruning and per-channel quantization treat layers apart); large ones are shared by name (a tied embedding
    table stays one table).
    """
    initializers = {t.name: t for t in model.graph.initializer}
    outputs = {v.name for v in model.graph.output}
    rename: dict[str, str] = {}
    kept: list[onnx.NodeProto] = []
    for node in model.graph.node:
        source = node.input[0] if node.op_type == "Identity" and node.domain in ("", "ai.onnx") else None
        if source is None or source not in initializers or node.output[0] in outputs:
            kept.append(node)
            continue
        tensor = initializers[source]
        if (int(np.prod(tensor.dims)) if tensor.dims else 1) <= _COPY_MAX_ELEMENTS:
            copy = TensorProto()
            copy.CopyFrom(tensor)
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
        else:
            rename[node.output[0]] = source
    resolved = len(model.graph.node) - len(kept)
    if resolved:
        del model.graph.node[:]
        model.graph.node.extend(kept)
        for node in graph.all_nodes(model):
            for index, name in enumerate(node.input):
                if name in rename:
                    node.input[index] = rename[name]
    return resolved


def merge_duplicate_constants(model: onnx.ModelProto) -> int:
    """Byte-identical small non-weight initializers become one; returns how many were dropped."""
    graph_inputs = {v.name for v in model.graph.input}
    groups: dict[tuple[int, tuple[int, ...], str], list[TensorProto]] = defaultdict(list)
    for tensor in model.graph.initializer:
        elements = int(np.prod(tensor.dims)) if tensor.dims else 1
        is_float = tensor.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE,
                                        TensorProto.BFLOAT16)
        if tensor.name in graph_inputs or elements > _MERGE_MAX_ELEMENTS or (is_float and elements > 1):
            continue
        if tensor.data_location == TensorProto.EXTERNAL:
            continue
        digest = hashlib.sha256(numpy_helper.to_array(tensor).tobytes()).hexdigest()
        groups[(tensor.data_type, tuple(tensor.dims), digest)].append(tensor)
    rename = {t.name: same[0].name for same in groups.values() if len(same) > 1 for t in same[1:]}
    if not rename:
        return 0
    for node in graph.all_nodes(model):
        for index, name in enumerate(node.input):
            if name in rename:
                node.input[index] = rename[name]
    kept = [t for t in model.graph.initializer if t.name not in rename]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return len(rename)


def _upgrade_opset(model: onnx.ModelProto) -> dict[str, Any]:
    version = graph.default_opset(model)
    if version >= MIN_OPSET:
        return {"opset": version}
    try:
        converted = graph.structural(model, lambda proto: onnx.version_converter.convert_version(proto, MIN_OPSET))
    except Exception as exc:  # the converter raises bare RuntimeErrors naming the op it cannot adapt
        return {"opset": version, "opset_upgrade_failed": f"{version} -> {MIN_OPSET}: {str(exc)[:200]}"}
    model.CopyFrom(converted)
    return {"opset": MIN_OPSET, "opset_upgraded": {"from": version, "to": MIN_OPSET,
                                                   "why": "per-channel quantization needs opset 13"}}


def _infer_shapes(model: onnx.ModelProto) -> str:
    try:
        inferred = graph.infer_shapes(model, data_prop=True)
    except Exception as exc:  # contrib ops or inconsistent exports: later steps do without the annotations
        return f"failed ({str(exc).splitlines()[0][:160]})"
    model.CopyFrom(inferred)
    return f"{len(model.graph.value_info)} intermediate shapes recorded"


def _check_feeds(data: ModelData | None) -> dict[str, np.ndarray] | None:
    if data is None or len(data) == 0:
        return None
    return next(data.take(_CHECK_SAMPLES).batches(_CHECK_SAMPLES))


def _differs(candidate: Path, feeds: dict[str, np.ndarray] | None, reference: list[Any] | None,
             threads: int) -> str | None:
    """None when the candidate opens and (given inputs) reproduces the reference; else what went wrong."""
    try:
        session = graph.session(candidate, threads)
    except Exception as exc:  # onnxruntime's own exception types
        return f"onnxruntime cannot open it: {str(exc).splitlines()[0][:200]}"
    if feeds is None or reference is None:
        return None
    try:
        got = session.run(None, feeds)
    except Exception as exc:
        return f"it fails to run: {str(exc).splitlines()[0][:200]}"
    for name, want, have in zip([o.name for o in session.get_outputs()], reference, got, strict=True):
        want, have = np.asarray(want), np.asarray(have)
        if want.shape != have.shape:
            return f"output '{name}' has shape {have.shape}, the original {want.shape}"
        if want.dtype.kind in "fc":
            scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1.0)
            error = float(np.max(np.abs(want - have))) if want.size else 0.0
            if not error <= _TOLERANCE * scale:
                return f"output '{name}' differs by {error:.3g}"
        elif not np.array_equal(want, have):
            return f"output '{name}' differs"
    return None
