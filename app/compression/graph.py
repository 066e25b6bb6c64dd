"""ONNX model plumbing shared by every step: load/save, tensor info, sessions, graph walks, the per-step check."""

from __future__ import annotations

import heapq
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from app.compression.errors import StepFailed


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output; None marks a dynamic dimension."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    @property
    def dynamic_batch(self) -> bool:
        return len(self.shape) > 0 and self.shape[0] is None


def load(path: Path, weights: bool = True) -> onnx.ModelProto:
    """The model; with `weights=False` only its structure (external data stays on disk)."""
    return onnx.load(str(path), load_external_data=weights)


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Write the model with every opset domain its nodes use declared: one file, or, past protobuf's 2 GB, the
    graph in `path` and the large weights in `<path>.data` beside it (the layout exporters write)."""
    declare_domains(model)
    sidecar = external_data_path(path)
    sidecar.unlink(missing_ok=True)  # a smaller model written over a large one leaves none behind
    if not is_large(model):
        onnx.save_model(model, str(path), save_as_external_data=False)
        return path
    weights = strip_weights(model)
    try:
        temp = sidecar.with_name(sidecar.name + ".part")
        with open(temp, "wb") as handle:
            for tensor in _stashed(model):
                offset = handle.tell()
                handle.write(weights[tensor.name])
                del tensor.external_data[:]
                for key, value in (("location", sidecar.name), ("offset", str(offset)),
                                   ("length", str(len(weights[tensor.name])))):
                    tensor.external_data.add(key=key, value=value)
        temp.replace(sidecar)
        onnx.save_model(model, str(path), save_as_external_data=False)
    finally:
        for tensor in model.graph.initializer:
            if tensor.name in weights:  # the caller's model keeps its weights in memory
                tensor.raw_data = weights[tensor.name]
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
    return path


# Protobuf's limit on one message (and so one .onnx file); LARGE_MODEL_BYTES may be lowered to test the path.
_PROTOBUF_LIMIT = 2**31 - 1
LARGE_MODEL_BYTES = _PROTOBUF_LIMIT
# Initializers at least this large go to external data and are set aside by strip_weights; smaller ones (shapes,
# biases) stay in the graph, for analyses.
EXTERNAL_MIN_BYTES = 1 << 16
_STASH = "slimserve-stashed-weights"


def is_large(model: onnx.ModelProto) -> bool:
    """Past what one protobuf message holds (protobuf refuses even to measure such a message)."""
    try:
        return bool(model.ByteSize() > LARGE_MODEL_BYTES)
    except Exception:  # google.protobuf.message.EncodeError
        return True


def external_data_path(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def strip_weights(model: onnx.ModelProto) -> dict[str, bytes]:
    """Move the large initializers' bytes out of the proto (which keeps their dtype and dims), so that what
    serializes the whole model (shape inference, the version converter, a copy) works past 2 GB and does not
    copy gigabytes. Put them back with `restore_weights`, by name."""
    from onnx import numpy_helper

    stash: dict[str, bytes] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        if tensor.HasField("raw_data"):
            if len(tensor.raw_data) < EXTERNAL_MIN_BYTES:
                continue
            stash[tensor.name] = tensor.raw_data
        else:
            if helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize * int(np.prod(tensor.dims)) \
                    < EXTERNAL_MIN_BYTES:
                continue
            stash[tensor.name] = numpy_helper.to_array(tensor).tobytes()
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(field)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        tensor.external_data.add(key="location", value=_STASH)
    return stash


def restore_weights(model: onnx.ModelProto, stash: dict[str, bytes]) -> None:
    """Put back what `strip_weights` set aside; refuses a model that lost track of a stashed tensor."""
    for tensor in _stashed(model):
        if tensor.name not in stash:
            raise StepFailed(f"initializer '{tensor.name}' lost its weights while the graph was rewritten")
        tensor.raw_data = stash[tensor.name]
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def _stashed(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == _STASH for e in t.external_data)]


def structural(model: onnx.ModelProto,
               transform: Callable[[onnx.ModelProto], onnx.ModelProto]) -> onnx.ModelProto:
    """A whole-model transform that serializes the model (shape inference, the version converter) at any size:
    past 2 GB it runs on the structure, the weights set aside and put back into its result by name."""
    if not is_large(model):
        return transform(model)
    weights = strip_weights(model)
    try:
        result = transform(model)
    finally:
        restore_weights(model, weights)
    restore_weights(result, weights)
    return result


def infer_shapes(model: onnx.ModelProto, **options: Any) -> onnx.ModelProto:
    return structural(model, lambda proto: onnx.shape_inference.infer_shapes(proto, **options))


def model_files(path: Path) -> list[Path]:
    """The .onnx file and the external data files it names (beside it), in that order."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    names: list[str] = []
    for tensor in _all_tensors(load(path, weights=False)):
        if uses_external_data(tensor):
            location = ExternalDataInfo(tensor).location
            if location not in names:
                names.append(location)
    return [path, *(path.parent / name for name in names)]


def model_bytes(path: Path) -> int:
    """What the model occupies on disk, external data included."""
    return sum(p.stat().st_size for p in model_files(path))


def rename_external_data(path: Path, name: str) -> bool:
    """Give the model's one external data file another name (its references follow; the weights are not read).
    False when there was nothing to rename."""
    files = model_files(path)
    if len(files) != 2 or files[1].name == name:
        return False
    structure = load(path, weights=False)
    for tensor in _all_tensors(structure):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == files[1].name:
                entry.value = name
    files[1].rename(path.parent / name)
    onnx.save_model(structure, str(path), save_as_external_data=False)
    return True


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    from onnx.external_data_helper import _get_all_tensors

    return list(_get_all_tensors(model))


def gzip_bytes(path: Path) -> int:
    """The model's size gzipped (level 6), streamed over its files: how much sparsity and clustering save on the
    wire and in storage."""
    import zlib

    compressor, total = zlib.compressobj(6, zlib.DEFLATED, 31), 0
    for file in model_files(path):
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 22):
                total += len(compressor.compress(chunk))
    return total + len(compressor.flush())


def copy_model(source: Path, target: Path) -> Path:
    """`source` as `target`: a plain copy, or for a model with external data, saved again so that its data file
    follows the new name."""
    import shutil

    if len(model_files(source)) == 1:
        external_data_path(target).unlink(missing_ok=True)
        shutil.copyfile(source, target)
        return target
    return save(load(source), target)


def without_shape_annotations(path: Path) -> bool:
    """Drop the intermediate shapes steps recorded (`value_info`); True if there were any.

    onnxruntime fuses differently when a file carries them: on a BERT export they turn on SkipLayerNormalization
    fusions that ran 10% slower in float and 15% slower in INT8 than the same model without them. A variant
    should differ from its upload only by what the recipe did. Models with external data keep them (rewriting
    gigabytes for this is not worth it)."""
    if len(model_files(path)) > 1:
        return False
    model = load(path)
    if not model.graph.value_info:
        return False
    del model.graph.value_info[:]
    save(model, path)
    return True


def _tensor_info(value: onnx.ValueInfoProto) -> TensorInfo:
    tensor = value.type.tensor_type
    # Some exporters write -1 (Paddle2ONNX) or 0 as a fixed value for a dynamic axis: dynamic it is.
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim)
    return TensorInfo(value.name, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), dims)


def io_info(model: onnx.ModelProto | Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    proto = load(model, weights=False) if isinstance(model, Path) else model
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [_tensor_info(v) for v in proto.graph.input if v.name not in initializers]
    return inputs, [_tensor_info(v) for v in proto.graph.output]


# A model that needs onnxruntime session config entries to run as measured names them here (JSON object), e.g.
# weight-only int8 Conv weights that onnxruntime folds back to float once at load (`session.disable_quant_qdq`).
SESSION_CONFIG_KEY = "slimserve.session_config"


def session_config(model: Path | onnx.ModelProto) -> dict[str, str]:
    """The onnxruntime session config entries a model asks for (empty for almost every model)."""
    if isinstance(model, Path):
        stat = model.stat()
        key = (str(model), stat.st_mtime_ns, stat.st_size)
        if key not in _CONFIG_CACHE:
            if len(_CONFIG_CACHE) > 64:
                _CONFIG_CACHE.clear()
            _CONFIG_CACHE[key] = session_config(load(model, weights=False))
        return dict(_CONFIG_CACHE[key])
    entry = next((p.value for p in model.metadata_props if p.key == SESSION_CONFIG_KEY), None)
    return {str(k): str(v) for k, v in json.loads(entry).items()} if entry else {}


_CONFIG_CACHE: dict[tuple[str, int, int], dict[str, str]] = {}


def set_session_config(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    kept = [p for p in model.metadata_props if p.key != SESSION_CONFIG_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if entries:
        model.metadata_props.append(onnx.StringStringEntryProto(key=SESSION_CONFIG_KEY,
                                                                value=json.dumps(entries, sort_keys=True)))


def session(path: Path | bytes, threads: int = 1, quiet: bool = False) -> ort.InferenceSession:
    """A CPU session with the model's own session config entries, as the server opens it; `quiet` keeps
    onnxruntime from logging the errors of runs expected to fail (probes)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4 if quiet else 3
    if isinstance(path, Path):
        for key, value in session_config(path).items():
            options.add_session_config_entry(key, value)
    source = str(path) if isinstance(path, Path) else path
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


_OPEN_CHILD = (
    "import json, sys, onnxruntime as ort\n"
    "options = ort.SessionOptions(); options.log_severity_level = 3\n"
    "for key, value in json.loads(sys.argv[2]).items(): options.add_session_config_entry(key, value)\n"
    "ort.InferenceSession(sys.argv[1], options, providers=['CPUExecutionProvider'])\n"
)
_OPEN_TIMEOUT_SECONDS = 600


def opens_safely(candidate: Path) -> str | None:
    """Open the model in a child process first, as the server will (all optimizations): None if it opens.

    onnxruntime crashes (SIGSEGV) on some graphs instead of refusing them, and a crash here would take the worker
    down with the job, or later the server that loads the variant. Otherwise what onnxruntime said is returned.
    """
    command = [sys.executable, "-P", "-c", _OPEN_CHILD, str(candidate), json.dumps(session_config(candidate))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_OPEN_TIMEOUT_SECONDS,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"onnxruntime did not finish opening it in {_OPEN_TIMEOUT_SECONDS} s"
    if done.returncode < 0:
        return f"onnxruntime crashed opening it (signal {-done.returncode})"
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return (lines[-1] if lines else f"exit status {done.returncode}")[:300]
    return None


def check_step_output(original: Path, candidate: Path, step: str) -> None:
    """The result of a step must load, open, and keep the original's inputs and outputs exactly."""
    try:
        onnx.checker.check_model(str(candidate), full_check=True)
    except Exception as exc:
        raise StepFailed(f"{step} produced a model that fails the ONNX checker: {_first_line(exc)}") from None
    problem = opens_safely(candidate)
    if problem is not None:
        raise StepFailed(f"{step} produced a model onnxruntime cannot open: {problem}")
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


def restore_io_shapes(original: Path, candidate: Path) -> bool:
    """Give the candidate's graph inputs and outputs the original's declared shapes, dim names included.

    Tools rewrite a dynamic axis as they like (onnxruntime drops `batch` names; -1 becomes unknown), but the
    served model must keep the interface users and clients see. Only an input or output of the same name,
    element type and rank is touched; anything else is left for `check_step_output` to refuse.
    Returns whether the candidate file was rewritten.
    """
    want = load(original, weights=False).graph
    proto = load(candidate)
    changed = False
    for ours, theirs in ((want.input, proto.graph.input), (want.output, proto.graph.output)):
        by_name = {v.name: v for v in ours}
        for value in theirs:
            reference = by_name.get(value.name)
            if reference is None or reference.type == value.type:
                continue
            a, b = reference.type.tensor_type, value.type.tensor_type
            if a.elem_type != b.elem_type or len(a.shape.dim) != len(b.shape.dim):
                continue
            value.type.CopyFrom(reference.type)
            changed = True
    if changed:
        save(proto, candidate)
    return changed


def model_family(model: onnx.ModelProto) -> str:
    """`transformer`, `cnn` or `mlp`: which recipes are worth trying.

    Attention decides first: a vision transformer has a Conv patch embedding but is a transformer.
    """
    ops = {node.op_type for node in model.graph.node}
    constants = constant_names(model)
    attention = ops & {"Attention", "MultiHeadAttention", "PackedAttention", "GroupQueryAttention"} or (
        "Softmax" in ops and any(n.op_type == "MatMul" and not constants & set(n.input) for n in model.graph.node))
    if attention:
        return "transformer"
    if "Conv" in ops:
        return "cnn"
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


# Versions declared for contrib domains that a graph uses without declaring them.
_DOMAIN_VERSIONS = {"com.microsoft": 1, "ai.onnx.ml": 3, "com.microsoft.nchwc": 1, "ai.onnx.training": 1,
                    "ai.onnx.preview.training": 1}


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def declare_domains(model: onnx.ModelProto) -> list[str]:
    """Add an opset import for every domain a node uses but the model does not declare; returns them."""
    declared = {o.domain or "" for o in model.opset_import} | ({""} if any(
        o.domain == "ai.onnx" for o in model.opset_import) else set())
    missing = sorted({n.domain or "" for n in all_nodes(model)} - declared)
    for domain in missing:
        model.opset_import.append(helper.make_opsetid(domain, _DOMAIN_VERSIONS.get(domain, 1)))
    return missing


def prune_opsets(model: onnx.ModelProto) -> None:
    """Keep only the opset imports that nodes use: onnxruntime's saved graphs declare every domain it knows."""
    used = {n.domain or "" for n in all_nodes(model)} | {""}
    used.update(f.domain for f in model.functions)
    kept = [o for o in model.opset_import if (o.domain or "") in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
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
