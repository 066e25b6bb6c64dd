"""The `quantize` step: onnxruntime's INT8 dynamic and static (QDQ), FP16 and INT4 weight-only tools.

Every mode is path in, path out, writes one self-contained ONNX file and returns notes for the report: what
was quantized, what stayed float and why, the options chosen and the fidelity measured against the input.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.compression import graph
from app.compression.config import QuantizeStep
from app.compression.context import StepContext
from app.compression.errors import InvalidRecipe
from app.compression.quantize.dynamic import run_dynamic
from app.compression.quantize.fp16 import run_fp16
from app.compression.quantize.int4 import run_int4
from app.compression.quantize.static import run_static
from app.compression.scoring import size_notes


def run(model: Path, output: Path, step: QuantizeStep, ctx: StepContext) -> dict[str, Any]:
    """Quantize `model` into `output` as `step.mode` says; returns the notes for the report.

    Raises:
        UnsupportedModel: the mode finds nothing to quantize in this model.
        DataRequired: static mode on a model with non-float inputs and no dataset.
        InvalidRecipe: op_types the mode cannot quantize.
    """
    if not isinstance(step, QuantizeStep):
        raise InvalidRecipe(f"the quantize step got a '{getattr(step, 'op', type(step).__name__)}' configuration")
    if step.mode not in _MODES or step.algorithm is not None:
        raise InvalidRecipe("mode 'int8' (weight-only) and 'algorithm' apply to generation models (causal LMs); "
                            "this model takes modes " + ", ".join(_MODES))
    mode: Callable[[Path, Path, QuantizeStep, StepContext], dict[str, Any]] = _MODES[step.mode]
    ctx.progress(0.0, step.mode)
    notes = mode(model, output, step, ctx)
    ctx.progress(1.0, "quantized")
    return {"mode": step.mode, **notes, **size_notes(model, output)}


def _static(model: Path, output: Path, step: QuantizeStep, ctx: StepContext) -> dict[str, Any]:
    notes = run_static(model, ctx.workdir / "static.onnx", step, ctx)
    graph.save(graph.load(ctx.workdir / "static.onnx"), output)
    return notes


def _fp16(model: Path, output: Path, step: QuantizeStep, ctx: StepContext) -> dict[str, Any]:
    notes = run_fp16(model, ctx.workdir / "fp16.onnx", step, ctx)
    graph.copy_model(ctx.workdir / "fp16.onnx", output)
    return notes


_MODES: dict[str, Callable[[Path, Path, QuantizeStep, StepContext], dict[str, Any]]] = {
    "dynamic": run_dynamic, "static": _static, "fp16": _fp16, "int4": run_int4,
}
