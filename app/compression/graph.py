"""ONNX model plumbing shared by every step: load/save, tensor info, sessions, graph walks, the per-step check."""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from app.compression.errors import StepFailed

_PROTOBUF_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output; None marks a dynamic dimension."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    @property
    def dynamic_batch(self) -> bool:
        return len(self.shape) > 0 and self.shape[0] is None


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Write one self-contained file (no external-data sidecar)."""
    if model.ByteSize() > _PROTOBUF_LIMIT:
        raise StepFailed("the result is larger than 2 GB, which one ONNX file cannot hold")
    onnx.save_model(model, str(path), save_as_external_data=False)
    return path


def _tensor_info(value: onnx.ValueInfoProto) -> TensorInfo:
    tensor = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    return TensorInfo(value.name, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), dims)


def io_info(model: onnx.ModelProto | Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    proto = load(model) if isinstance(model, Path) else model
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [_tensor_info(v) for v in proto.graph.input if v.name not in initializers]
    return inputs, [_tensor_info(v) for v in proto.graph.output]


def session(path: Path | bytes, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = str(path) if isinstance(path, Path) else path
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def check_step_output(original: Path, candidate: Path, step: str) -> None:
    """The result of a step must load, open, and keep the original's inputs and outputs exactly."""
    try:
        onnx.checker.check_model(str(candidate), full_check=True)
    except Exception as exc:
        raise StepFailed(f"{step} produced a model that fails the ONNX checker: {_first_line(exc)}") from None
    try:
        session(candidate)
    except Exception as exc:
        raise StepFailed(f"{step} produced a model onnxruntime cannot open: {_first_line(exc)}") from None
    want_in, want_out = io_info(original)
    got_in, got_out = io_info(candidate)
    for kind, want, got in (("inputs", want_in, got_in), ("outputs", want_out, got_out)):
        if [(t.name, t.dtype) for t in want] != [(t.name, t.dtype) for t in got]:
            raise StepFailed(
                f"{step} changed the model's {kind}: {describe_tensors(want)} became {describe_tensors(got)}")
        for w, g in zip(want, got, strict=True):
            same_rank = len(w.shape) == len(g.shape)
            if not same_rank or any(a is not None and a != b for a, b in zip(w.shape, g.shape, strict=True)):
                raise StepFailed(f"{step} changed the shape of {kind[:-1]} '{w.name}' from {w.shape} to {g.shape}")


def model_family(model: onnx.ModelProto) -> str:
    """`cnn`, `transformer` or `mlp`: which recipes are worth trying."""
    ops = {node.op_type for node in model.graph.node}
    if "Conv" in ops:
        return "cnn"
    if ops & {"Softmax", "LayerNormalization", "Attention", "MultiHeadAttention"} and ops & {"MatMul", "Gemm"}:
        return "transformer"
    return "mlp"


def count_parameters(model: onnx.ModelProto) -> tuple[int, int]:
    """(elements, non-zero elements) over every initializer."""
    total = nonzero = 0
    for tensor in model.graph.initializer:
        array = onnx.numpy_helper.to_array(tensor)
        total += array.size
        nonzero += int(np.count_nonzero(array))
    return total, nonzero


def describe_tensors(tensors: list[TensorInfo]) -> str:
    return "[" + ", ".join(f"{t.name}:{t.dtype}" for t in tensors) + "]"


def _first_line(exc: object) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type; contrib ops keep their domain so `FusedConv` is not taken for `Conv`."""
    counts = Counter(f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                     for n in model.graph.node)
    return dict(sorted(counts.items()))


def op_types(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def constant_names(model: onnx.ModelProto) -> set[str]:
    names = {i.name for i in model.graph.initializer}
    names.update(o for n in model.graph.node if n.op_type == "Constant" for o in n.output)
    return names


def toposort(graph: onnx.GraphProto) -> None:
    """Order nodes producer-first, otherwise keeping their order (some converters append Casts at the end)."""
    nodes = list(graph.node)
    producer = {name: index for index, node in enumerate(nodes) for name in node.output if name}
    waits_on = [{producer[name] for name in node.input if name in producer} - {index}
                for index, node in enumerate(nodes)]
    consumers: dict[int, list[int]] = {}
    for index, deps in enumerate(waits_on):
        for dep in deps:
            consumers.setdefault(dep, []).append(index)
    pending = [len(deps) for deps in waits_on]
    ready = [index for index, count in enumerate(pending) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for consumer in consumers.get(index, []):
            pending[consumer] -= 1
            if pending[consumer] == 0:
                heapq.heappush(ready, consumer)
    placed = set(order)
    order.extend(i for i in range(len(nodes)) if i not in placed)  # a cycle: leave it for the checker to name
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def prune_opsets(model: onnx.ModelProto) -> None:
    """Keep only the opset imports that nodes use: onnxruntime's saved graphs declare every domain it knows."""
    used = {n.domain or "" for n in _all_nodes(model)} | {""}
    used.update(f.domain for f in model.functions)
    kept = [o for o in model.opset_import if (o.domain or "") in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def _all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    nodes: list[onnx.NodeProto] = []
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            nodes.append(node)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(attr.graphs)
    for function in model.functions:
        nodes.extend(function.node)
    return nodes
