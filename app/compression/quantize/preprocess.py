"""onnxruntime's quantization pre-processing (`quant_pre_process`), done in-process with paths we choose.

The same three stages as onnxruntime's tool: symbolic shape inference, onnxruntime's basic graph optimization,
then ONNX shape inference. Run by hand because the tool's symbolic stage, when it cannot infer every shape (most
transformer-optimized graphs), dumps `sym_shape_infer_temp.onnx` and a `<uuid>.data` file into the process's
current directory; here that stage runs without its debugging dump, and everything else is written in the step's
own work folder. (An earlier version ran the tool in a child process for the same reason: two interpreter
start-ups and imports of the quantization package per step, about 1.2 s each.)
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from app.compression import graph


def preprocess(model: Path, output: Path, workdir: Path, progress: Callable[[float, str], None]) -> dict[str, Any]:
    """Shape inference and basic optimization before quantizing; returns what was done for the notes.

    Goes on without symbolic shape inference when it fails, and with the model as it is when the optimization
    fails (the quantizers then run with less shape information).
    """
    progress(0.02, "pre-processing")
    proto = graph.load(model)
    notes: dict[str, Any] = {"preprocessing": "quant_pre_process stages"}
    inferred, problem = _symbolic_shapes(proto)
    notes["symbolic_shape_inference"] = inferred is not None
    if inferred is None:
        notes["preprocessing_fallback"] = f"symbolic shape inference failed ({problem}); retried without it"
    else:
        proto = inferred
    progress(0.04, "pre-processing")
    source = graph.save(proto, workdir / "pre-shapes.onnx")
    optimized = workdir / "pre-optimized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types
        graph.save(graph.load(model), output)
        return {"preprocessing": None, "symbolic_shape_inference": False,
                "preprocessing_fallback": f"onnxruntime's optimization failed ({_first_line(exc)}); quantized the "
                                          "model as it is"}
    result = graph.load(optimized)
    try:
        result = graph.infer_shapes(result)
    except Exception as exc:  # contrib ops that ONNX shape inference does not know
        notes["onnx_shape_inference"] = f"skipped ({_first_line(exc)})"
    graph.save(result, output)
    return notes


def _symbolic_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto | None, str]:
    """onnxruntime's symbolic shape inference as `SymbolicShapeInference.infer_shapes` runs it, minus the file it
    writes into the current directory when it gives up."""
    try:
        inference = _symbolic_module().SymbolicShapeInference(2**31 - 1, False, False, 0)
        inference._preprocess(model)
        complete = False
        while inference.run_:
            complete = inference._infer_impl()
        inference._update_output_from_vi()
    except Exception as exc:  # it raises bare Exceptions and assertion errors on graphs it cannot follow
        return None, _first_line(exc)
    if not complete:
        return None, "Incomplete symbolic shape inference"
    result: onnx.ModelProto = inference.out_mp_
    return result, ""


def _symbolic_module() -> Any:
    """onnxruntime/tools/symbolic_shape_infer.py, loaded by its path: importing it as `onnxruntime.tools...`
    runs that package's __init__, which imports torch (2 s and hundreds of MB, for nothing here)."""
    name = "slimserve_symbolic_shape_infer"
    if name not in sys.modules:
        location = Path(ort.__file__).parent / "tools" / "symbolic_shape_infer.py"
        spec = importlib.util.spec_from_file_location(name, location)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _first_line(exc: object) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
