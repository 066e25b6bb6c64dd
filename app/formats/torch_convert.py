"""Convert a vetted PyTorch file to ONNX in the worker, then prove the ONNX computes what PyTorch computes.

torch.export archives are read through `torch_archive.vet_exported_program` (no pickles, no eval of strings from
the file) and exported with the dynamo exporter; TorchScript files are loaded by torch's C++ loader, which knows
only TorchScript types, and exported with the TorchScript exporter after their operators are checked.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.errors import InvalidContent
from app.formats.torch_archive import TORCH_EXPORT, TORCHSCRIPT, vet_exported_program
from app.formats.torch_inputs import InputShapes, InputSpec, example_feeds, named_axes

log = logging.getLogger(__name__)

OPSET = 18
CHECK_ROWS = 8
# The converted model is refused when it differs from PyTorch by more than this, relative to the output's scale.
TOLERANCE = 1e-3
_SCRIPT_NAMESPACES = ("aten::", "prim::")
_REFUSED_SCRIPT_OPS = {"aten::from_file", "aten::save", "aten::_print", "prim::PythonOp", "prim::IgnoredPythonOp",
                       "aten::_nested_from_file"}

Progress = Callable[[float, str], None]


def _not_torchvision_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("torchvision is not installed")


# The exporter logs this once per torchvision operator on every export; torchvision ops never occur in our input.
logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(_not_torchvision_notice)


@dataclass
class Conversion:
    max_abs_error: float
    rows_checked: int
    dynamic_axes: dict[str, list[int]]
    exporter: str
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"max_abs_error": self.max_abs_error, "rows_checked": self.rows_checked,
                "dynamic_axes": self.dynamic_axes, "exporter": self.exporter, "tolerance": TOLERANCE}


def convert(source: Path, kind: str, output: Path, *, label: str, samples: dict[str, np.ndarray] | None,
            input_shapes: InputShapes | None, progress: Progress, seed: int = 0) -> Conversion:
    import torch

    torch.manual_seed(seed)
    progress(0.05, f"loading the {kind} file")
    with warnings.catch_warnings():
        # torch's own deprecation notices while exporting say nothing about the user's model.
        warnings.simplefilter("ignore")
        if kind == TORCH_EXPORT:
            return _convert_exported(source, output, label, samples, input_shapes, progress)
        if kind == TORCHSCRIPT:
            return _convert_script(source, output, label, samples, input_shapes, progress)
    raise ValueError(f"unknown PyTorch format {kind}")


# ---------------------------------------------------------------- torch.export


def _load_exported(path: Path, label: str) -> tuple[Any, tuple[Any, ...] | None]:
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    from torch.export.pt2_archive._package import PT2ArchiveReader, _load_constants, _load_state_dict

    from app.formats.torch_archive import sniff

    archive = sniff(path, path.name, label)
    if archive is None or archive.kind != TORCH_EXPORT:
        raise InvalidContent(f"{label} is not a torch.export archive")
    vetted = vet_exported_program(path, archive.root, label)
    try:
        with PT2ArchiveReader(str(path)) as reader:
            # Safe only because vetting refused pickled payloads: these read raw tensor bytes.
            state_dict = _load_state_dict(reader, vetted.model_name)
            constants = _load_constants(reader, vetted.model_name)
            example = _example_from_archive(reader, vetted.model_name)
            serialized = _dict_to_dataclass(schema.ExportedProgram, vetted.program)  # type: ignore[no-untyped-call]
            program = ExportedProgramDeserializer(None).deserialize(
                serialized, state_dict, constants, example if example is not None else ((), {}))
    except InvalidContent:
        raise
    except Exception as exc:
        raise InvalidContent(f"{label} could not be read as a torch.export program: {_first_line(exc)}") from None
    return program, example


def _example_from_archive(reader: Any, model_name: str) -> tuple[Any, ...] | None:
    import torch

    name = f"data/sample_inputs/{model_name}.pt"
    if name not in reader.get_file_names():
        return None
    try:
        example = torch.load(io.BytesIO(reader.read_bytes(name)), weights_only=True, map_location="cpu")
    except Exception:  # an example that needs more than tensors is simply not used
        return None
    return example if isinstance(example, tuple) and len(example) == 2 else None


def _convert_exported(source: Path, output: Path, label: str, samples: dict[str, np.ndarray] | None,
                      input_shapes: InputShapes | None, progress: Progress) -> Conversion:
    import torch

    program, archived = _load_exported(source, label)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    names = list(program.graph_signature.user_inputs)
    specs = []
    for name in names:
        value = placeholders[name].meta.get("val")
        dtype = _numpy_dtype(value.dtype) if value is not None else None
        dims: list[int | str] = [d if isinstance(d, int) else str(d) for d in value.shape] if value is not None else []
        specs.append(InputSpec(name, dims, dtype))
    archived_feeds = None
    if archived is not None and not archived[1] and len(archived[0]) == len(names):
        archived_feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, archived[0], strict=True)
                          if isinstance(t, torch.Tensor)}
    feeds = example_feeds(specs, samples, input_shapes, label, fallback=archived_feeds)
    module = program.module()
    notes: list[str] = []
    batch_dynamic = all(not (spec.dims and isinstance(spec.dims[0], int)) for spec in specs)
    if not batch_dynamic:
        progress(0.2, "re-exporting with a dynamic batch axis")
        program, batch_dynamic = _with_dynamic_batch(program, module, specs, feeds, input_shapes)
        if not batch_dynamic:
            notes.append(f"the batch size is fixed at {next(iter(feeds.values())).shape[0]}: the program was "
                         "exported with static shapes and does not re-export with a dynamic batch; export it with "
                         "dynamic_shapes to serve any batch size")
    progress(0.4, "exporting to ONNX")
    try:
        onnx_program = torch.onnx.export(program, tuple(torch.from_numpy(feeds[n]) for n in names),
                                         dynamo=True, opset_version=OPSET, external_data=False, optimize=True,
                                         verbose=False)
    except Exception as exc:
        raise InvalidContent(f"{label} could not be exported to ONNX: {_first_line(exc)}") from None
    assert onnx_program is not None

    def run(batch: dict[str, np.ndarray]) -> Any:
        with torch.no_grad():
            return module(*(torch.from_numpy(batch[n]) for n in names))

    # The dynamo exporter flattens outputs in pytree order, the order _output_names follows.
    outputs, output_names = onnx_program.model.graph.outputs, _output_names(run(feeds), names)
    if len(output_names) != len(outputs):  # _check then says how the two differ
        output_names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
    for value, name in zip(outputs, output_names, strict=True):
        value.name = name
    onnx_program.save(str(output), external_data=False)

    def reference(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        return _flatten_outputs(run(batch))

    return _check(output, names, feeds, samples, reference, progress, "dynamo", notes, label)


def _with_dynamic_batch(program: Any, module: Any, specs: list[InputSpec], feeds: dict[str, np.ndarray],
                        input_shapes: InputShapes | None) -> tuple[Any, bool]:
    import torch

    dims: dict[str, Any] = {"batch": torch.export.Dim("batch")}
    shapes: dict[str, dict[int, Any]] = {}
    for spec in specs:
        axes = {0: dims["batch"]}
        declared = (input_shapes or {}).get(spec.name, {}).get("shape", [])
        for axis, dim in enumerate(declared):
            if axis > 0 and isinstance(dim, str):
                axes[axis] = dims.setdefault(dim, torch.export.Dim(dim))  # one Dim per name: shared axes
        shapes[spec.name] = axes
    try:
        exported = torch.export.export(module, tuple(torch.from_numpy(feeds[s.name]) for s in specs),
                                       dynamic_shapes=shapes, strict=False)
    except Exception as exc:
        log.info("dynamic-batch re-export failed: %s", _first_line(exc))
        return program, False
    return exported, True


# ---------------------------------------------------------------- TorchScript


def _convert_script(source: Path, output: Path, label: str, samples: dict[str, np.ndarray] | None,
                    input_shapes: InputShapes | None, progress: Progress) -> Conversion:
    import torch

    try:
        module = torch.jit.load(str(source), map_location="cpu")  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise InvalidContent(f"{label} could not be loaded as TorchScript: {_first_line(exc)}") from None
    module.eval()
    _vet_script(module, label)
    arguments = module.forward.schema.arguments[1:]
    if any(str(a.type) != "Tensor" for a in arguments):
        raise InvalidContent(f"{label}: forward() takes {', '.join(f'{a.name}: {a.type}' for a in arguments)}; "
                             "only tensor arguments can become ONNX inputs")
    names = [a.name for a in arguments]
    specs = [InputSpec(name, [], None) for name in names]
    if samples is None and input_shapes is None:
        raise InvalidContent(f"{label} is TorchScript, which records no input shapes: upload it with 'samples' "
                             "(an .npz with one array per input) or 'input_shapes'")
    feeds = example_feeds(specs, samples, input_shapes, label, fallback=None)
    dynamic = named_axes(names, feeds, input_shapes)
    args = tuple(torch.from_numpy(feeds[n]) for n in names)
    with torch.no_grad():
        example_result = module(*args)
    if _holds_dict(example_result):
        raise InvalidContent(f"{label} returns a dict, which the TorchScript exporter cannot export: return a tuple "
                             "from forward(), or upload a torch.export archive (.pt2), which keeps the keys as "
                             "output names", code="unsupported_output")
    output_names = _output_names(example_result, names)
    progress(0.4, "exporting to ONNX")
    notes: list[str] = []

    def export(axes: dict[str, dict[int, str]] | None) -> None:
        # The TorchScript exporter is deprecated for nn.Modules; for a ScriptModule it is the faithful path.
        torch.onnx.export(module, args, str(output), dynamo=False, opset_version=OPSET, input_names=names,
                          output_names=output_names, dynamic_axes=axes)

    try:
        export({**dynamic, **{o: {0: "batch"} for o in output_names}})
    except Exception as exc:
        raise InvalidContent(f"{label} could not be exported to ONNX: {_first_line(exc)}") from None

    def reference(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return _flatten_outputs(module(*(torch.from_numpy(batch[n]) for n in names)))

    try:
        return _check(output, names, feeds, samples, reference, progress, "torchscript", notes, label,
                      dynamic_axes={n: sorted(axes) for n, axes in dynamic.items()}, can_fix_batch=True)
    except _BatchSpecialised as exc:
        # A trace can bake the example's batch size into a reshape: serve that size only, and say so.
        export(None)
        notes.append(f"the batch size is fixed at {exc.rows}: the traced graph gives wrong answers at other batch "
                     "sizes (a size was recorded as a constant); script the model or trace it with "
                     "dynamic-shape-friendly code to serve any batch size")
        return _check(output, names, feeds, samples, reference, progress, "torchscript", notes, label,
                      dynamic_axes={})


def _vet_script(module: Any, label: str) -> None:
    """Refuse TorchScript that reaches outside tensor maths (files, Python callbacks, other op libraries)."""
    root = module.forward.inlined_graph  # held: its blocks die with it
    pending = [root]
    while pending:
        graph = pending.pop()
        for node in graph.nodes():
            kind = node.kind()
            if not kind.startswith(_SCRIPT_NAMESPACES) or kind in _REFUSED_SCRIPT_OPS:
                raise InvalidContent(f"{label} calls '{kind}', which is not a standard tensor operator; it is not "
                                     "converted", code="unsupported_operator")
            pending.extend(node.blocks())  # blocks of If/Loop have nodes() like a graph


def _holds_dict(result: Any) -> bool:
    if isinstance(result, dict):
        return True
    return isinstance(result, (tuple, list)) and any(_holds_dict(item) for item in result)


# ---------------------------------------------------------------- shared


class _BatchSpecialised(Exception):
    def __init__(self, rows: int) -> None:
        super().__init__(rows)
        self.rows = rows


def _check(path: Path, names: list[str], feeds: dict[str, np.ndarray], samples: dict[str, np.ndarray] | None,
           reference: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
           progress: Progress, exporter: str, notes: list[str], label: str,
           dynamic_axes: dict[str, list[int]] | None = None, can_fix_batch: bool = False) -> Conversion:
    """Compare ONNX with PyTorch on the example, and on a different batch size when the batch axis is dynamic.

    With `can_fix_batch`, a model right only at the example's batch size raises _BatchSpecialised."""
    progress(0.7, "comparing the ONNX model with PyTorch")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InvalidContent(f"the ONNX model converted from {label} does not load: {_first_line(exc)}") from None
    inputs = session.get_inputs()
    onnx_dynamic = {i.name: [axis for axis, d in enumerate(i.shape) if not isinstance(d, int)] for i in inputs}
    batches = [feeds]
    if all(0 in onnx_dynamic.get(n, []) for n in names):
        batches.append(_other_batch(feeds, samples, names))
    worst, rows = 0.0, 0
    for batch in batches:
        rows_here = next(iter(batch.values())).shape[0] if batch else 0
        try:
            error, scale = _compare(session, batch, reference, label)
        except (InvalidContent, RuntimeError) as exc:
            if batch is feeds:
                raise InvalidContent(f"the ONNX model converted from {label} fails on the example inputs: "
                                     f"{_first_line(exc)}") from None
            error, scale = float("inf"), 0.0
        if error > TOLERANCE * max(1.0, scale):
            if batch is not feeds:
                example_rows = next(iter(feeds.values())).shape[0]
                if can_fix_batch:
                    raise _BatchSpecialised(example_rows)
                raise InvalidContent(f"the ONNX model converted from {label} is right at batch size {example_rows} "
                                     f"but not at {rows_here}; it was not accepted")
            raise InvalidContent(
                f"the ONNX model converted from {label} differs from PyTorch by up to {error:.3g} (tolerance "
                f"{TOLERANCE:g} of the output scale {scale:.3g}); it was not accepted")
        worst, rows = max(worst, error), rows + rows_here
    progress(0.9, "converted")
    return Conversion(max_abs_error=float(worst), rows_checked=rows,
                      dynamic_axes={k: v for k, v in onnx_dynamic.items() if v} if dynamic_axes is None
                      else dynamic_axes, exporter=exporter, warnings=notes)


def _compare(session: ort.InferenceSession, batch: dict[str, np.ndarray],
             reference: Callable[[dict[str, np.ndarray]], list[np.ndarray]], label: str) -> tuple[float, float]:
    try:
        got = session.run(None, batch)
    except Exception as exc:  # onnxruntime's errors share no base class
        raise InvalidContent(_first_line(exc)) from None
    return _max_error(reference(batch), got, label)


def _other_batch(feeds: dict[str, np.ndarray], samples: dict[str, np.ndarray] | None,
                 names: list[str]) -> dict[str, np.ndarray]:
    rows = next(iter(feeds.values())).shape[0]
    if samples is not None and all(len(samples[n]) > rows for n in names):
        return {n: np.ascontiguousarray(samples[n][:CHECK_ROWS]) if len(samples[n]) > rows + 1
                else np.ascontiguousarray(samples[n]) for n in names}
    # Without more samples: the example rows repeated into a batch of another size.
    return {n: np.ascontiguousarray(np.concatenate([feeds[n]] * 3 + [feeds[n][:1]])) for n in names}


def _max_error(expected: list[np.ndarray], got: list[Any], label: str) -> tuple[float, float]:
    if len(expected) != len(got):
        raise InvalidContent(f"the ONNX model converted from {label} has {len(got)} outputs, PyTorch "
                             f"{len(expected)}")
    error, scale = 0.0, 0.0
    for ref, out in zip(expected, got, strict=True):
        out = np.asarray(out)
        if ref.shape != out.shape:
            raise InvalidContent(f"the ONNX model converted from {label} gives shape {list(out.shape)} where "
                                 f"PyTorch gives {list(ref.shape)}")
        if ref.size:
            error = max(error, float(np.max(np.abs(ref.astype(np.float64) - out.astype(np.float64)))))
            scale = max(scale, float(np.max(np.abs(ref.astype(np.float64)))))
    return error, scale


def _flatten_outputs(result: Any) -> list[np.ndarray]:
    import torch

    if isinstance(result, torch.Tensor):
        return [result.detach().numpy()]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in _flatten_outputs(item)]
    if isinstance(result, dict):
        return [t for item in result.values() for t in _flatten_outputs(item)]
    raise InvalidContent(f"the model returns a {type(result).__name__}; only tensors (or tuples of them) can be "
                         "served")


def _output_names(result: Any, input_names: list[str]) -> list[str]:
    """One name per flattened output: `output` for a lone tensor, the keys of a dict and the fields of a named
    tuple where the model returns them (`logits`, `hidden.0`), `output_0`, `output_1` for plain tuples."""
    from torch.utils import _pytree as pytree

    _flatten_outputs(result)  # refuses what cannot be served, in words
    leaves = pytree.tree_flatten_with_path(result)[0]
    if len(leaves) == 1 and not leaves[0][0]:
        return ["output"]
    taken, names = set(input_names), []
    for path, _ in leaves:
        parts = [str(key.key) if isinstance(key, pytree.MappingKey) else key.name
                 if isinstance(key, pytree.GetAttrKey) else str(getattr(key, "idx", key)) for key in path]
        name = ".".join(parts)
        if isinstance(path[0], pytree.SequenceKey):
            name = f"output_{name}"
        while name in taken:  # an ONNX graph needs distinct names, inputs included
            name = f"{name}_output"
        taken.add(name)
        names.append(name)
    return names


def _numpy_dtype(dtype: Any) -> np.dtype[Any] | None:
    import torch

    try:
        return np.dtype(torch.empty(0, dtype=dtype).numpy().dtype)
    except (TypeError, RuntimeError):
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]
