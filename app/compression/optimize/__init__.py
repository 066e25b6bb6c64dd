"""The `optimize` step: onnxruntime's graph optimizations applied offline and saved into the model.

Levels `basic` and `extended` are onnxruntime's own (constant folding and redundancy removal; then fusions
such as Conv+BN+activation into FusedConv). `transformer` runs onnxruntime's transformer optimizer
(SkipLayerNormalization, BiasGelu, Attention, ...), after our fusion of packed-QKV attention, which that
optimizer does not recognise. Weights are unchanged; the step checks that the outputs are too, and measures
whether the optimized model is faster, reporting honestly when it is not.

Contrib ops (domain com.microsoft, e.g. FusedConv, SkipLayerNormalization, Attention) are declared in the
model's opset imports. The ONNX checker accepts nodes of a declared non-ONNX domain without validating them,
so for those nodes the real check is the one that follows it: onnxruntime must open the model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from app.compression import graph
from app.compression.config import OptimizeStep
from app.compression.context import StepContext
from app.compression.data import ModelData
from app.compression.errors import InvalidRecipe, StepFailed
from app.compression.graph import op_counts, prune_opsets
from app.compression.optimize.transformer import TransformerFusions
from app.compression.scoring import Fidelity, Reference, latency, sample_data

LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
# Fusions reorder float arithmetic, nothing more: a larger difference means a wrong rewrite.
MAX_RELATIVE_ERROR = 1e-3
# Below this speedup (at every batch size measured) we report that the optimization does not pay.
PAYS_FROM = 1.05
_CHECK_SAMPLES = 64
_BATCH_N = 32
# Op types whose appearance means the transformer optimizer fused something.
FUSED_OPS = ("Attention", "MultiHeadAttention", "EmbedLayerNormalization", "SkipLayerNormalization",
             "SkipSimplifiedLayerNormalization", "LayerNormalization", "SimplifiedLayerNormalization", "Gelu",
             "FastGelu", "BiasGelu", "GemmFastGelu", "BiasAdd", "FusedConv", "FusedGemm", "FusedMatMul")


def run(model: Path, output: Path, step: OptimizeStep, ctx: StepContext) -> dict[str, Any]:
    """Optimize `model` into `output` at `step.level`; returns the notes for the report.

    Raises:
        StepFailed: the optimized model computes something else than the input (a fusion bug).
    """
    if not isinstance(step, OptimizeStep):
        raise InvalidRecipe(f"the optimize step got a '{getattr(step, 'op', type(step).__name__)}' configuration")
    level = resolve_level(step.level, model)
    ctx.progress(0.0, level)
    before = op_counts(graph.load(model))
    data = sample_data(model, ctx, _CHECK_SAMPLES)
    reference = Reference(model, data, ctx.threads) if data is not None else None

    def check(candidate: Path) -> dict[str, Any] | None:
        return _checked(reference, candidate)

    if level == "transformer":
        fusions = TransformerFusions(model, ctx.workdir, check)
        ctx.progress(0.2, "transformer fusions")
        speed = None if data is None else (lambda candidate: _speedups(model, candidate, data, ctx)[1])
        _save(graph.load(fusions.search(speed).path), output)
        notes = fusions.notes
    else:
        notes = {"onnxruntime_level": LEVELS[level].name}
        _save(_ort_optimized(model, level, ctx.workdir), output)
        notes["fidelity"] = check(output)
    ctx.progress(0.8, "measuring latency")
    timing = _timing(model, output, data, ctx)
    if timing["speedup"] and max(timing["speedup"].values()) < 1 / PAYS_FROM:
        graph.copy_model(model, output)  # slower at every batch size measured: the input is the better model
        timing["kept_input"] = f"the optimized graph was slower ({timing['verdict']}); the input is kept"
    after = op_counts(graph.load(output))
    notes.update({
        "level": level, "level_requested": step.level, "op_counts": {"input": before, "output": after},
        "nodes": {"input": sum(before.values()), "output": sum(after.values())},
        "fused": _fused(before, after), **timing,
    })
    ctx.progress(1.0, "optimized")
    return notes


def resolve_level(level: str, model: Path) -> str:
    """`auto`: the transformer fusions where the graph is a transformer, else onnxruntime's basic level
    (constant folding and clean-ups that every later step can still work on)."""
    if level != "auto":
        return level
    return "transformer" if graph.model_family(graph.load(model)) == "transformer" else "basic"


def _ort_optimized(model: Path, level: str, workdir: Path) -> onnx.ModelProto:
    """onnxruntime's own optimizer at `level`, as it would run at load time, saved to a file."""
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.optimized_model_filepath = str(workdir / f"ort-{level}.onnx")
    options.log_severity_level = 3
    if len(graph.model_files(model)) > 1:
        # Past 2 GB onnxruntime must write the weights beside the graph; else it would name the input's files.
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         f"ort-{level}.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise StepFailed(f"onnxruntime cannot open the model to optimize it: {str(exc)[:300]}") from None
    return graph.load(workdir / f"ort-{level}.onnx")


def _save(proto: onnx.ModelProto, output: Path) -> None:
    prune_opsets(proto)
    graph.save(proto, output)


def _checked(reference: Reference | None, output: Path) -> dict[str, Any] | None:
    """The optimized model's outputs against the input's; StepFailed beyond float reordering noise."""
    if reference is None:
        return None
    fidelity: Fidelity = reference.measure(output)
    scale = max(float(np.max(np.abs(reference.outputs))), 1.0)
    if fidelity.max_abs_error > MAX_RELATIVE_ERROR * scale:
        raise StepFailed(f"optimize changed the model's outputs (max abs error {fidelity.max_abs_error:.3g}); "
                         "this is an optimizer bug, use another level")
    return fidelity.as_dict()


def _fused(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Fused op types that appeared or grew in number."""
    names = {f"com.microsoft:{op}" for op in FUSED_OPS} | set(FUSED_OPS)
    return {op: after[op] - before.get(op, 0) for op in sorted(after) if op in names and after[op] > before.get(op, 0)}


def _speedups(model: Path, candidate: Path, data: ModelData,
              ctx: StepContext) -> tuple[dict[str, Any], dict[str, float]]:
    """Median latency of input and candidate (one thread, warmed up, alternating) at batch 1 and batch N."""
    inputs, _ = graph.io_info(model)
    sizes = [1] + ([min(_BATCH_N, len(data))] if all(t.dynamic_batch for t in inputs) and len(data) > 1 else [])
    timings: dict[str, Any] = {}
    speedup: dict[str, float] = {}
    for size in sizes:
        ctx.progress(0.5, f"timing batch {size}")
        feeds = next(data.take(size).batches(size))
        base, optimized = latency([model, candidate], feeds, threads=ctx.threads)
        timings[f"batch_{size}"] = {"input": base, "output": optimized}
        speedup[f"batch_{size}"] = round(base["p50"] / optimized["p50"], 3)
    return timings, speedup


def _timing(model: Path, output: Path, data: ModelData | None, ctx: StepContext) -> dict[str, Any]:
    if data is None:
        return {"latency_ms": None, "speedup": None, "pays": None,
                "verdict": "not measured: no dataset, and inputs that cannot be generated"}
    timings, speedup = _speedups(model, output, data, ctx)
    return {"latency_ms": timings, "speedup": speedup, **_verdict(speedup), "threads": ctx.threads,
            "load_ms": {"input": _load_ms(model), "output": _load_ms(output)},
            "latency_settings": "onnxruntime defaults (all optimizations at load), as the server runs models"}


def _verdict(speedup: dict[str, float]) -> dict[str, Any]:
    """Pays when faster at some batch size and slower at none (beyond noise)."""
    shown = ", ".join(f"{v:.2f}x at {k.replace('_', ' ')}" for k, v in speedup.items())
    if max(speedup.values()) >= PAYS_FROM and min(speedup.values()) >= 1 / PAYS_FROM:
        return {"pays": True, "verdict": f"pays: {shown}"}
    if max(speedup.values()) >= PAYS_FROM:
        return {"pays": False, "verdict": f"mixed: {shown}"}
    return {"pays": False, "verdict": f"does not pay ({shown}): onnxruntime applies the same optimizations "
                                      "when it loads the input model; only the load time shrinks"}


def _load_ms(path: Path) -> float:
    """Best of three session creations: what offline optimization saves at every model load."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        graph.session(path)
        times.append((time.perf_counter() - started) * 1e3)
    return round(min(times), 2)
