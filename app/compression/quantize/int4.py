"""INT4 weight-only: MatMul (and Gather) weights in 4-bit blocks (MatMulNBits), activations stay float."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from app.compression import graph
from app.compression.config import QuantizeStep
from app.compression.context import StepContext
from app.compression.errors import InvalidRecipe, UnsupportedModel
from app.compression.quantize.weights import gemm_to_matmul, quantized_counts, weighted_nodes
from app.compression.scoring import Fidelity, Reference, fidelity_dict, latency, sample_data

INT4_OPS = {"MatMul", "Gather"}
# float32 compute first: the reference the int8-activation level must match to be chosen
_AUTO_LEVELS = (1, 4)
_LEVEL_COSINE_SLACK = 0.001
_LEVEL_AGREEMENT_SLACK = 0.005
# Below this latency gain the exact level is kept.
_LEVEL_MIN_GAIN = 0.05


def run_int4(model: Path, output: Path, step: QuantizeStep, ctx: StepContext) -> dict[str, Any]:
    proto = graph.load(model)
    kinds = sorted(set(step.op_types or ["MatMul"]))
    if set(kinds) - INT4_OPS:
        raise InvalidRecipe(f"int4 quantizes MatMul (and Gather) weights only, not {', '.join(set(kinds) - INT4_OPS)}")
    # MatMulNBits replaces MatMul only: Linear layers exported as Gemm become MatMul + Add first.
    rewritten = gemm_to_matmul(proto) if "MatMul" in kinds else []
    targets = weighted_nodes(proto, set(kinds))
    if not [n for n in targets if n.op_type == "MatMul"] and not ("Gather" in kinds and targets):
        others = sorted({n.op_type for n in proto.graph.node} & {"Conv", "ConvTranspose", "LSTM", "GRU"})
        hint = f" (its {', '.join(others)} layers have no 4-bit kernel: use mode 'dynamic' or 'static')" \
            if others else ""
        raise UnsupportedModel(f"int4 needs MatMul or Gemm layers with constant weights; this model has none{hint}")
    ctx.progress(0.2, "quantizing weights to 4 bits")
    quantizer = _nbits_quantizer()(proto, bits=4, block_size=step.block_size, is_symmetric=True,
                                     op_types_to_quantize=tuple(kinds))
    with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero block (a padding row) has scale 0: stored 0
        quantizer.process()
    data = sample_data(model, ctx)
    ctx.progress(0.7, "measuring fidelity")
    reference = Reference(model, data, ctx.threads) if data is not None else None
    levels = _accuracy_levels(quantizer.model.model, output, step, reference, ctx)
    return {
        "op_types_quantized": kinds, "block_size": step.block_size, "symmetric": True, "bits": 4,
        **levels,
        "preprocessing": None, "preprocessing_reason": "weight-only: needs no shapes or calibration",
        "weights_candidate": len(targets), "gemm_rewritten_to_matmul": len(rewritten),
        **quantized_counts(graph.load(output)),
        "fidelity_data": None if data is None else {"source": data.source, "samples": len(data)},
    }


def _accuracy_levels(proto: onnx.ModelProto, output: Path, step: QuantizeStep, reference: Reference | None,
                     ctx: StepContext) -> dict[str, Any]:
    """Write the model with the chosen MatMulNBits accuracy level; with auto, each level is measured first.

    Level 4 quantizes the activations to int8 blocks inside the kernel: faster where the CPU has integer dot
    products, and reported to pick wrong top tokens on models with outlier channels (microsoft/onnxruntime#29849),
    hence measured.
    """
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    if step.accuracy_level != "auto" or not nbits or reference is None:
        level: int = 0 if step.accuracy_level == "auto" else step.accuracy_level
        _set_level(nbits, level)
        graph.save(proto, output)
        fidelity = reference.measure(output) if reference is not None else None
        reason = "given" if step.accuracy_level != "auto" else "no MatMulNBits or no samples to measure on"
        return {"accuracy_level": level, "accuracy_level_reason": reason, "fidelity": fidelity_dict(fidelity)}
    candidates = []
    for level in _AUTO_LEVELS:
        _set_level(nbits, level)
        candidates.append(graph.save(proto, ctx.workdir / f"int4-level{level}.onnx"))
    feeds = next(reference.data.take(min(len(reference.data), 8)).batches(8))
    timings = latency(candidates, feeds, ctx.threads)
    measured = [_Level(level, timing["p50"], reference.measure(path), path)
                for level, timing, path in zip(_AUTO_LEVELS, timings, candidates, strict=True)]
    exact = measured[0]
    faithful = [m for m in measured if m.fidelity.cosine_mean >= exact.fidelity.cosine_mean - _LEVEL_COSINE_SLACK
                and (m.fidelity.agreement or 1.0) >= (exact.fidelity.agreement or 1.0) - _LEVEL_AGREEMENT_SLACK]
    best = min(faithful, key=lambda m: m.latency_ms)
    if best.latency_ms > exact.latency_ms * (1 - _LEVEL_MIN_GAIN):
        best = exact  # not worth the extra rounding
    graph.copy_model(best.path, output)
    return {"accuracy_level": best.level, "accuracy_level_reason": "measured",
            "accuracy_levels_measured": [{"accuracy_level": m.level, "latency_ms": m.latency_ms,
                                          "fidelity": m.fidelity.as_dict()} for m in measured],
            "fidelity": best.fidelity.as_dict()}


@dataclass
class _Level:
    level: int
    latency_ms: float
    fidelity: Fidelity
    path: Path


def _set_level(nodes: list[onnx.NodeProto], level: int) -> None:
    for node in nodes:
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend(kept)
        if level:
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))


def _nbits_quantizer() -> Any:
    """Imported on first use, undoing its import-time `logging.basicConfig(level=INFO)`.

    In a process that has not configured logging, that call would turn on INFO logging process-wide (one line
    per node from every quantizer); in one that has, it does nothing and neither do we.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    return MatMulNBitsQuantizer
