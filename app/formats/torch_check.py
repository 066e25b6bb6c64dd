"""Prove a converted ONNX model computes what PyTorch computes, and name its outputs after PyTorch's.

The ONNX model runs on the example inputs and on a second batch size (when its batch axis is dynamic) beside the
PyTorch module; it is accepted only within TOLERANCE of the output's scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.errors import InvalidContent

CHECK_ROWS = 8
# The converted model is refused when it differs from PyTorch by more than this, relative to the output's scale.
TOLERANCE = 1e-3

Progress = Callable[[float, str], None]
Reference = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


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


class BatchSpecialised(Exception):
    """The ONNX model is right at the example's batch size only (a trace recorded that size as a constant)."""

    def __init__(self, rows: int) -> None:
        super().__init__(rows)
        self.rows = rows


def check(path: Path, names: list[str], feeds: dict[str, np.ndarray], samples: dict[str, np.ndarray] | None,
          reference: Reference, progress: Progress, exporter: str, notes: list[str], label: str,
          dynamic_axes: dict[str, list[int]] | None = None, can_fix_batch: bool = False) -> Conversion:
    """Compare ONNX with PyTorch on the example, and on a different batch size when the batch axis is dynamic.

    With `can_fix_batch`, a model right only at the example's batch size raises BatchSpecialised."""
    progress(0.7, "comparing the ONNX model with PyTorch")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InvalidContent(f"the ONNX model converted from {label} does not load: {first_line(exc)}") from None
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
                                     f"{first_line(exc)}") from None
            error, scale = float("inf"), 0.0
        if error > TOLERANCE * max(1.0, scale):
            if batch is not feeds:
                example_rows = next(iter(feeds.values())).shape[0]
                if can_fix_batch:
                    raise BatchSpecialised(example_rows)
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
             reference: Reference, label: str) -> tuple[float, float]:
    try:
        got = session.run(None, batch)
    except Exception as exc:  # onnxruntime's errors share no base class
        raise InvalidContent(first_line(exc)) from None
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


def flatten_outputs(result: Any) -> list[np.ndarray]:
    import torch

    if isinstance(result, torch.Tensor):
        return [result.detach().numpy()]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in flatten_outputs(item)]
    if isinstance(result, dict):
        return [t for item in result.values() for t in flatten_outputs(item)]
    raise InvalidContent(f"the model returns a {type(result).__name__}; only tensors (or tuples of them) can be "
                         "served")


def name_outputs(result: Any, input_names: list[str]) -> list[str]:
    """One name per flattened output: `output` for a lone tensor, the keys of a dict and the fields of a named
    tuple where the model returns them (`logits`, `hidden.0`), `output_0`, `output_1` for plain tuples."""
    from torch.utils import _pytree as pytree

    flatten_outputs(result)  # refuses what cannot be served, in words
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


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]
