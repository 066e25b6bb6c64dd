"""Convert a vetted PyTorch file to ONNX in the worker, then prove the ONNX computes what PyTorch computes.

torch.export archives are read through `torch_archive.vet_exported_program` (no pickles, no eval of strings from
the file) and exported with the dynamo exporter; TorchScript files are loaded by torch's C++ loader, which knows
only TorchScript types, and exported with the TorchScript exporter after their operators are checked.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import InvalidContent
from app.formats.torch_archive import REFUSED_ATEN, TORCH_EXPORT, TORCHSCRIPT, vet_exported_program
from app.formats.torch_check import (
    BatchSpecialised,
    Conversion,
    Progress,
    check,
    first_line,
    flatten_outputs,
    name_outputs,
)
from app.formats.torch_inputs import InputShapes, InputSpec, example_feeds, named_axes

log = logging.getLogger(__name__)

OPSET = 18
_SCRIPT_NAMESPACES = ("aten::", "prim::")
_REFUSED_SCRIPT_OPS = {f"aten::{op}" for op in REFUSED_ATEN} | {"prim::PythonOp", "prim::IgnoredPythonOp"}


def _not_torchvision_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("torchvision is not installed")


# The exporter logs this once per torchvision operator on every export; torchvision ops never occur in our input.
logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(_not_torchvision_notice)


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
        raise InvalidContent(f"{label} could not be read as a torch.export program: {first_line(exc)}") from None
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
        raise InvalidContent(f"{label} could not be exported to ONNX: {first_line(exc)}") from None
    assert onnx_program is not None

    def run(batch: dict[str, np.ndarray]) -> Any:
        with torch.no_grad():
            return module(*(torch.from_numpy(batch[n]) for n in names))

    example = run(feeds)
    # The dynamo exporter flattens outputs in pytree order, the order name_outputs follows.
    outputs, output_names = onnx_program.model.graph.outputs, name_outputs(example, names)
    if len(output_names) != len(outputs):  # check() then says how the two differ
        output_names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
    for value, name in zip(outputs, output_names, strict=True):
        value.name = name
    onnx_program.save(str(output), external_data=False)

    def reference(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        return flatten_outputs(example if batch is feeds else run(batch))

    return check(output, names, feeds, samples, reference, progress, "dynamo", notes, label)


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
        log.info("dynamic-batch re-export failed: %s", first_line(exc))
        return program, False
    return exported, True


# ---------------------------------------------------------------- TorchScript


SCALAR_TYPES = ("int", "float", "bool")


def _scalar_values(arguments: list[tuple[str, str]], samples: dict[str, np.ndarray] | None,
                   input_shapes: InputShapes | None, label: str) -> dict[str, Any]:
    """The value each Python scalar argument of forward() is fixed at: from a 0-d array of the samples, or
    `input_shapes` {name: {"value": ...}}."""
    cast = {"int": int, "float": float, "bool": bool}
    values: dict[str, Any] = {}
    for name, kind in arguments:
        if samples is not None and name in samples and np.asarray(samples[name]).size == 1:
            values[name] = cast[kind](np.asarray(samples[name]).reshape(-1)[0].item())
        elif input_shapes is not None and "value" in (input_shapes.get(name) or {}):
            values[name] = cast[kind](input_shapes[name]["value"])
        else:
            raise InvalidContent(f"{label}: forward() takes {name}: {kind}, a Python value that cannot be an ONNX "
                                 f"input; give the value to export with, in 'samples' (a 0-d array named '{name}') "
                                 f"or 'input_shapes' ({{\"{name}\": {{\"value\": ...}}}})",
                                 code="example_inputs_required")
    return values


def _bind_scalars(path: Path, fixed: dict[str, Any]) -> None:
    """Turn the exporter's inputs for forward()'s Python scalars into constants: the ONNX model takes tensors only,
    and a caller could not know which value the graph was traced for."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    kept = []
    for value in model.graph.input:
        if value.name in fixed:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            model.graph.initializer.append(numpy_helper.from_array(np.array(fixed[value.name], dtype=dtype),
                                                                   value.name))
        else:
            kept.append(value)
    del model.graph.input[:]
    model.graph.input.extend(kept)
    onnx.save(model, str(path))


def _convert_script(source: Path, output: Path, label: str, samples: dict[str, np.ndarray] | None,
                    input_shapes: InputShapes | None, progress: Progress) -> Conversion:
    import torch

    try:
        module = torch.jit.load(str(source), map_location="cpu")  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise InvalidContent(f"{label} could not be loaded as TorchScript: {first_line(exc)}") from None
    module.eval()
    _vet_script(module, label)
    arguments = module.forward.schema.arguments[1:]
    unsupported = [a for a in arguments if str(a.type) not in ("Tensor", *SCALAR_TYPES)]
    if unsupported:
        raise InvalidContent(f"{label}: forward() takes {', '.join(f'{a.name}: {a.type}' for a in unsupported)}; "
                             "only tensors (and int, float or bool values, fixed at export) can become ONNX inputs")
    if samples is None and input_shapes is None:
        raise InvalidContent(f"{label} is TorchScript, which records no input shapes: upload it with 'samples' "
                             "(an .npz with one array per input) or 'input_shapes'")
    fixed = _scalar_values([(a.name, str(a.type)) for a in arguments if str(a.type) in SCALAR_TYPES], samples,
                           input_shapes, label)
    names = [a.name for a in arguments if a.name not in fixed]
    specs = [InputSpec(name, [], None) for name in names]
    shapes = {k: v for k, v in input_shapes.items() if k not in fixed} if input_shapes is not None else None
    feeds = example_feeds(specs, samples, shapes, label, fallback=None)
    dynamic = named_axes(names, feeds, shapes)
    order = [a.name for a in arguments]

    def call(batch: dict[str, np.ndarray]) -> Any:
        # The exporter takes a ScriptModule's scalar arguments as inputs; they are bound to constants after export.
        return module(*(fixed[n] if n in fixed else torch.from_numpy(batch[n]) for n in order))

    args = tuple(fixed[n] if n in fixed else torch.from_numpy(feeds[n]) for n in order)
    with torch.no_grad():
        example = call(feeds)
    if _holds_dict(example):
        raise InvalidContent(f"{label} returns a dict, which the TorchScript exporter cannot export: return a tuple "
                             "from forward(), or upload a torch.export archive (.pt2), which keeps the keys as "
                             "output names", code="unsupported_output")
    output_names = name_outputs(example, names)
    progress(0.4, "exporting to ONNX")
    notes: list[str] = [f"forward()'s {name} is fixed at {value!r} in the ONNX model: a Python {type(value).__name__} "
                        "cannot be an ONNX input" for name, value in fixed.items()]

    def export(axes: dict[str, dict[int, str]] | None) -> None:
        # The TorchScript exporter is deprecated for nn.Modules; for a ScriptModule it is the faithful path.
        torch.onnx.export(module, args, str(output), dynamo=False, opset_version=OPSET, input_names=order,
                          output_names=output_names, dynamic_axes=axes)
        if fixed:
            _bind_scalars(output, fixed)

    try:
        export({**dynamic, **{o: {0: "batch"} for o in output_names}})
    except Exception as exc:
        raise InvalidContent(f"{label} could not be exported to ONNX: {first_line(exc)}") from None

    def reference(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        if batch is feeds:
            return flatten_outputs(example)
        with torch.no_grad():
            return flatten_outputs(call(batch))

    try:
        return check(output, names, feeds, samples, reference, progress, "torchscript", notes, label,
                      dynamic_axes={n: sorted(axes) for n, axes in dynamic.items()}, can_fix_batch=True)
    except BatchSpecialised as exc:
        # A trace can bake the example's batch size into a reshape: serve that size only, and say so.
        export(None)
        notes.append(f"the batch size is fixed at {exc.rows}: the traced graph gives wrong answers at other batch "
                     "sizes (a size was recorded as a constant); script the model or trace it with "
                     "dynamic-shape-friendly code to serve any batch size")
        return check(output, names, feeds, samples, reference, progress, "torchscript", notes, label,
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
    stateful = _attributes_set(module)
    if stateful:
        # A streaming model that remembers its last call: an ONNX graph has no memory, so an export would answer
        # every call as if it were the first.
        names = ", ".join(f"self.{n}" for n in sorted(stateful)[:6])
        raise InvalidContent(f"{label}: forward() keeps state between calls (it sets {names}); an ONNX model "
                             "cannot, so the export would answer differently: export a forward() that takes the "
                             "state as an input and returns the new state (as streaming models' own ONNX exports "
                             "do)", code="stateful_model")


def _attributes_set(module: Any) -> set[str]:
    """The attributes forward() assigns in eval mode: freezing folds `self.training` and drops the training-only
    branches (a step counter), keeping only the state a call really carries to the next."""
    import torch

    try:
        graph = torch.jit.freeze(module).forward.inlined_graph
    except Exception:  # freezing is an optimisation; the unfrozen graph says the same, more cautiously
        graph = module.forward.inlined_graph
    return {node.s("name") for node in graph.findAllNodes("prim::SetAttr", True)}


def _holds_dict(result: Any) -> bool:
    if isinstance(result, dict):
        return True
    return isinstance(result, (tuple, list)) and any(_holds_dict(item) for item in result)


def _numpy_dtype(dtype: Any) -> np.dtype[Any] | None:
    import torch

    try:
        return np.dtype(torch.empty(0, dtype=dtype).numpy().dtype)
    except (TypeError, RuntimeError):
        return None
