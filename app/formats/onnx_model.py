"""Validation and inspection of an uploaded ONNX file, before anything is stored."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper

from app.errors import InvalidContent, UnsupportedFormat
from app.runtime.datatypes import ORT_TO_V2, TensorSpec

log = logging.getLogger(__name__)

@dataclass
class OnnxInfo:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int | None
    parameters: int
    warnings: list[str] = field(default_factory=list)


def inspect_onnx(path: Path, *, display_name: str, providers: list[str],
                 folder: Path | None = None) -> tuple[OnnxInfo, ort.InferenceSession]:
    """Check the file completely and open it; raise a 4xx error naming the problem otherwise.

    `folder`: the model came in an archive, and its initializers may keep their data in files of that folder
    (never outside it); without one, external data is refused.
    """
    if path.stat().st_size == 0:
        raise InvalidContent(f"{display_name} is empty")
    model = _parse(path, display_name)
    if folder is None:
        _refuse_external_data(model)
    else:
        check_external_data(model, path.parent, folder)
    try:
        # by path: the checker then follows external data, and a model over 2 GB never passes through protobuf
        onnx.checker.check_model(str(path) if folder is not None else model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        # Shape inference cannot read shape constants kept in external data (saved with size_threshold=0):
        # the structural check still runs, and onnxruntime's own load below is the final word.
        if folder is None or "external tensors" not in str(exc):
            raise InvalidContent(f"{display_name} fails the ONNX checker: {_first_line(exc)}") from None
        try:
            onnx.checker.check_model(str(path), full_check=False)
        except onnx.checker.ValidationError as structural:
            raise InvalidContent(f"{display_name} fails the ONNX checker: {_first_line(structural)}") from None
    session = open_session(path, display_name=display_name, providers=providers)
    inputs = [_spec(arg, "input") for arg in session.get_inputs()]
    outputs = [_spec(arg, "output") for arg in session.get_outputs()]
    info = OnnxInfo(inputs=inputs, outputs=outputs, opset=_default_opset(model), parameters=_count_parameters(model))
    return info, session


def open_session(
    path: Path, *, display_name: str, providers: list[str], options: ort.SessionOptions | None = None
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises a family of pybind exceptions with no common base
        message = str(exc).replace(str(path), display_name)
        raise InvalidContent(f"onnxruntime cannot load {display_name}: {_first_line(message)}") from None


def smoke_test(
    session: ort.InferenceSession, inputs: list[TensorSpec], samples: dict[str, np.ndarray] | None
) -> str | None:
    """Run the model once; on samples (ready feeds) a failure is the user's error, on zeros only a warning."""
    if samples is not None:
        try:
            session.run(None, samples)
        except Exception as exc:
            raise InvalidContent(f"the model fails on the uploaded samples: {_first_line(exc)}") from None
        return None
    feeds = {spec.name: _zeros(spec) for spec in inputs}
    try:
        session.run(None, feeds)
    except Exception as exc:
        # Models with control flow or scalar parameters may legitimately refuse all-zero inputs.
        return f"a test run on all-zero inputs failed (the model may need real data): {_first_line(exc)}"
    return None


def onnx_proto(path: Path) -> onnx.ModelProto:
    """The model's graph and attributes, its external data left on disk."""
    return onnx.load(str(path), load_external_data=False)


def _parse(path: Path, display_name: str) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, or onnx's own errors on garbage
        raise InvalidContent(f"{display_name} is not a valid ONNX model ({_first_line(exc)})") from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise InvalidContent(f"{display_name} is not a valid ONNX model (no graph or IR version)")
    return model


def _refuse_external_data(model: onnx.ModelProto) -> None:
    for tensor in _all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if _leaves_folder(location):
            raise InvalidContent(
                f"initializer '{tensor.name}' points at external data '{location}', outside the upload"
            )
        raise InvalidContent(
            f"initializer '{tensor.name}' keeps its data in the external file '{location}', which is not part "
            "of the upload; save the model as one file (torch.onnx.export(..., external_data=False) or "
            "onnx.save_model(model, path, save_as_external_data=False))"
        )


def external_files(model: onnx.ModelProto) -> set[str]:
    """The external data files a model's initializers name (relative to the model file)."""
    found = set()
    for tensor in _all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            found.add(next((e.value for e in tensor.external_data if e.key == "location"), ""))
    return found


def check_external_data(model: onnx.ModelProto, base: Path, folder: Path) -> None:
    """Every external data reference stays inside `folder`, names a file there, and fits within it."""
    root = folder.resolve()
    for tensor in _all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve() if not _leaves_folder(location) else None
        if target is None or not target.is_relative_to(root):
            raise InvalidContent(f"initializer '{tensor.name}' points at external data '{location[:200]}', "
                                 "outside the archive")
        if not target.is_file():
            raise InvalidContent(f"initializer '{tensor.name}' keeps its data in '{location[:200]}', which the "
                                 "archive does not hold")
        offset, length = int(info.get("offset", 0) or 0), info.get("length")
        if length is not None and offset + int(length) > target.stat().st_size:
            raise InvalidContent(f"initializer '{tensor.name}' reads bytes {offset}..{offset + int(length)} of "
                                 f"'{location[:200]}', which has {target.stat().st_size}")


def _leaves_folder(location: str) -> bool:
    if not location or "\x00" in location or os.path.isabs(location) or location.startswith("\\"):
        return True
    parts = PurePosixPath(location.replace("\\", "/")).parts
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return True
    return False


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    graphs = [model.graph]
    nodes = [node for function in model.functions for node in function.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            yield from graph.initializer
            for sparse in graph.sparse_initializer:
                yield sparse.values
                yield sparse.indices
            nodes.extend(graph.node)
            continue
        node = nodes.pop()
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                graphs.append(attribute.g)
            graphs.extend(attribute.graphs)


def _spec(arg: ort.NodeArg, kind: str) -> TensorSpec:
    datatype = ORT_TO_V2.get(arg.type)
    if datatype is None:
        raise UnsupportedFormat(
            f"{kind} '{arg.name}' has type {arg.type}; only tensors of numeric, bool or string types can be served"
        )
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    names = tuple(d if isinstance(d, str) else None for d in (arg.shape or []))
    return TensorSpec(name=arg.name, datatype=datatype, shape=shape, dim_names=names)


def _default_opset(model: onnx.ModelProto) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def _count_parameters(model: onnx.ModelProto) -> int:
    total = 0
    for tensor in model.graph.initializer:
        total += int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    return total


def _zeros(spec: TensorSpec) -> np.ndarray:
    shape = tuple(1 if d < 0 else d for d in spec.shape)
    if spec.datatype == "BYTES":
        return np.full(shape, "", dtype=object)
    return np.zeros(shape, dtype=spec.numpy_dtype)


def _first_line(exc: object) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:500]
