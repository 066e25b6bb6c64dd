"""Static INT8 quantization in QDQ format, with a fidelity ladder that keeps sensitive ops in float."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.registry import QDQRegistry

from app.compression import data as model_data
from app.compression import graph
from app.compression.config import QuantizeStep
from app.compression.context import StepContext
from app.compression.data import ModelData
from app.compression.errors import DataRequired, UnsupportedModel
from app.compression.graph import constant_names
from app.compression.quantize.calibrate import (
    CALIBRATION_SAMPLES,
    METHODS,
    calibrate,
    calibration_feeds,
    nonfinite_tensors,
)
from app.compression.quantize.cpu import int8_saturates
from app.compression.quantize.preprocess import preprocess
from app.compression.quantize.qat import finetune
from app.compression.quantize.smooth import smooth
from app.compression.quantize.weights import nonfinite_constant_consumers, quantized_counts
from app.compression.scoring import Fidelity, Reference

# An attempt below either threshold (against the input model, on the calibration samples) triggers the next.
MIN_COSINE = 0.99
MIN_AGREEMENT = 0.99
# Normalizations have no integer kernel on CPU: Q/DQ around them adds error and work, never speed.
NO_INT8_KERNEL = {"LayerNormalization", "BatchNormalization", "InstanceNormalization"}
# Where quantization error concentrates in transformers: softmax inputs, normalizations, residual sums, GELU.
SENSITIVE_OPS = {"Softmax", "LayerNormalization", "SkipLayerNormalization", "Add", "Sub", "Mul", "Div", "Pow",
                 "Sqrt", "Erf", "Gelu", "FastGelu", "BiasGelu", "Exp", "Tanh", "Sigmoid", "Where", "ReduceMean",
                 "ReduceSum"}
# SmoothQuant's default migration strength, the one `smoothing: "auto"` tries.
_AUTO_ALPHA = 0.5
# Cosine SmoothQuant must add (everything quantized, calibration samples) to be kept.
_SMOOTHING_MIN_GAIN = 1e-4
# Share of the still-quantized nodes that the per-node pass returns to float, worst first.
_PER_NODE_SHARE = 0.25


@dataclass
class Attempt:
    name: str
    excluded: dict[str, str]
    """node name -> why it stays float"""
    path: Path
    fidelity: Fidelity | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"attempt": self.name, "nodes_excluded": len(self.excluded), **self.counts,
                "fidelity": self.fidelity.as_dict() if self.fidelity else None}


def run_static(model: Path, output: Path, step: QuantizeStep, ctx: StepContext) -> dict[str, Any]:
    data = _calibration_data(model, ctx)
    pre = ctx.workdir / "preprocessed.onnx"
    notes: dict[str, Any] = preprocess(model, pre, ctx.workdir, ctx.progress)
    proto = graph.load(pre)
    op_types, skipped_types = _op_types(proto, step)
    feeds = calibration_feeds(pre, data)
    if not feeds:
        raise DataRequired("static quantization needs at least one calibration sample")
    auto_excluded, skip_tensors = _nonfinite_nodes(proto, op_types, feeds[0], ctx.workdir)
    reference = Reference(model, data, ctx.threads)
    setups = _Setups(pre, op_types, step, feeds, skip_tensors, reference, auto_excluded, ctx)
    quantizer, first = setups.choose()
    attempts = _ladder(quantizer, first, graph.load(quantizer.pre), auto_excluded, ctx)
    chosen = _choose(attempts)
    qat: dict[str, Any] | None = None
    if step.qat is not None:
        ctx.progress(0.9, "quantization-aware training")
        qat = finetune(chosen.path, output, step.qat, ctx)
        qat["fidelity_before"] = chosen.fidelity.as_dict() if chosen.fidelity else None
        qat["fidelity_after"] = reference.measure(output).as_dict()
    else:
        graph.copy_model(chosen.path, output)
    notes.update({
        "activation_type": "uint8", "weight_type": "int8", "format": "QDQ", "per_channel": quantizer.per_channel,
        "activation_type_reason": "int8 activations run 2x slower than uint8 on this AVX2 CPU (no VNNI)",
        "reduce_range": int8_saturates(),
        "reduce_range_reason": "7-bit weights: this CPU's uint8 x int8 kernels (no VNNI) saturate with 8-bit ones"
        if int8_saturates() else "8-bit weights: this CPU has VNNI",
        "calibration": {"method": quantizer.method, "samples": sum(len(next(iter(f.values()))) for f in feeds),
                        "data": data.source, "tensors_skipped_non_finite": sorted(skip_tensors),
                        "candidates": setups.tried},
        "smoothing": quantizer.smoothing,
        "op_types_quantized": op_types, "op_types_skipped": skipped_types,
        "attempts": [a.summary() for a in attempts], "chosen_attempt": chosen.name,
        "nodes_excluded": [{"node": n, "reason": r} for n, r in sorted(chosen.excluded.items())],
        "fidelity": chosen.fidelity.as_dict() if chosen.fidelity else None,
        "fidelity_target": {"cosine_mean": MIN_COSINE, "agreement": MIN_AGREEMENT, "met": _good(chosen)},
        "qat": qat,
        **chosen.counts,
    })
    return notes


class _Setups:
    """Calibration method and SmoothQuant chosen by measurement: each candidate quantizes everything once.

    Every method the recipe allows is calibrated on the model as it is; then, with the most faithful method,
    the model smoothed at alpha 0.5 (SmoothQuant's default) is tried, and kept only if it measures better by more
    than noise.
    """

    def __init__(self, pre: Path, op_types: list[str], step: QuantizeStep, feeds: list[dict[str, np.ndarray]],
                 skip_tensors: set[str], reference: Reference, auto_excluded: dict[str, str],
                 ctx: StepContext) -> None:
        self.pre, self.op_types, self.step, self.feeds = pre, op_types, step, feeds
        self.skip, self.reference, self.excluded, self.ctx = skip_tensors, reference, auto_excluded, ctx
        self.tried: list[dict[str, Any]] = []

    def choose(self) -> tuple[_Quantizer, Attempt]:
        methods = list(METHODS) if self.step.calibration == "auto" else [self.step.calibration]
        fixed_alpha = self.step.smoothing if isinstance(self.step.smoothing, float) else None
        base = self._smoothed(fixed_alpha) if fixed_alpha is not None else (self.pre, None)
        results = [self._try(*base, method) for method in methods]
        best = max(results, key=lambda r: _score(r[1]))
        if self.step.smoothing == "auto":
            smoothed = self._smoothed(_AUTO_ALPHA)
            if smoothed[1] is not None and smoothed[1]["layer_norms"]:
                candidate = self._try(*smoothed, best[0].method)
                # Its restoring Muls cost time in post-LN models: a gain within measurement noise is not worth it.
                if _score(candidate[1])[1] > _score(best[1])[1] + _SMOOTHING_MIN_GAIN \
                        and _score(candidate[1])[0] >= _score(best[1])[0]:
                    best = candidate
        return best

    def _smoothed(self, alpha: float) -> tuple[Path, dict[str, Any] | None]:
        proto = graph.load(self.pre)
        notes = smooth(proto, self.feeds, alpha, self.ctx.threads)
        return graph.save(proto, self.ctx.workdir / f"smoothed-{alpha}.onnx"), notes

    def _try(self, model: Path, smoothing: dict[str, Any] | None, method: str) -> tuple[_Quantizer, Attempt]:
        index = len(self.tried)
        self.ctx.progress(0.05 + 0.5 * index / 4, f"calibrating ({method})")
        cache = calibrate(model, self.op_types, method, self.feeds, self.skip,
                          self.ctx.workdir / f"ranges-{index}.json", self.ctx.workdir, lambda f: None)
        quantizer = _Quantizer(model, self.op_types, self.step, method, cache, self.reference, self.ctx.workdir,
                               smoothing)
        attempt = quantizer.attempt(f"all-{index}", self.excluded)
        attempt.name = "all"
        self.tried.append({"method": method, "smoothing_alpha": smoothing["alpha"] if smoothing else None,
                           "fidelity": attempt.fidelity.as_dict() if attempt.fidelity else None})
        return quantizer, attempt


def _score(attempt: Attempt) -> tuple[float, float]:
    return attempt.fidelity.score() if attempt.fidelity else (-1.0, -1.0)


def _ladder(quantizer: _Quantizer, first: Attempt, proto: onnx.ModelProto, auto_excluded: dict[str, str],
            ctx: StepContext) -> list[Attempt]:
    """Everything quantizable (already made); below target, sensitive op types in float; then the worst nodes."""
    attempts = [first]
    ctx.progress(0.6, "measuring fidelity")
    if not _good(attempts[-1]):
        sensitive = {**_sensitive_nodes(proto, quantizer.op_types), **auto_excluded}
        if len(sensitive) > len(auto_excluded):
            attempts.append(quantizer.attempt("sensitive ops in float", sensitive))
            ctx.progress(0.75, "measuring fidelity")
    if not _good(attempts[-1]):
        worst = _worst_nodes(quantizer.pre, attempts[-1], quantizer.reference.data, ctx.workdir)
        if worst:
            attempts.append(quantizer.attempt("sensitive nodes in float", {**attempts[-1].excluded, **worst}))
            ctx.progress(0.9, "measuring fidelity")
    return attempts


class _Quantizer:
    def __init__(self, pre: Path, op_types: list[str], step: QuantizeStep, method: str, cache: Path,
                 reference: Reference, workdir: Path, smoothing: dict[str, Any] | None) -> None:
        self.pre, self.op_types, self.step, self.method, self.cache = pre, op_types, step, method, cache
        self.reference, self.workdir, self.smoothing = reference, workdir, smoothing
        self.per_channel = step.per_channel is not False  # per-channel weights unless the recipe says otherwise

    def attempt(self, name: str, excluded: dict[str, str]) -> Attempt:
        path = self.workdir / f"static-{name.replace(' ', '-')}.onnx"
        quantize_static(
            str(self.pre), str(path), calibration_data_reader=None, calibration_cache_path=str(self.cache),
            calibrate_method=METHODS[self.method], quant_format=QuantFormat.QDQ,
            op_types_to_quantize=self.op_types, nodes_to_exclude=sorted(excluded), per_channel=self.per_channel,
            reduce_range=int8_saturates(), activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            # transformer-optimized graphs have contrib-op outputs shape inference cannot type
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        result = Attempt(name, dict(excluded), path, counts=quantized_counts(graph.load(path)))
        result.fidelity = self.reference.measure(path)
        return result


def _calibration_data(model: Path, ctx: StepContext) -> ModelData:
    if ctx.train is not None:
        return ctx.train.take(CALIBRATION_SAMPLES)
    inputs, _ = graph.io_info(model)
    if any(t.dtype.kind != "f" for t in inputs):
        raise DataRequired("static quantization calibrates on real inputs, and this model has non-float inputs "
                           f"({', '.join(t.name for t in inputs if t.dtype.kind != 'f')}); upload a dataset, "
                           "or use mode 'dynamic', which needs none")
    return model_data.synthetic_for(model, seed=ctx.seed, samples=CALIBRATION_SAMPLES)


def _op_types(proto: onnx.ModelProto, step: QuantizeStep) -> tuple[list[str], dict[str, str]]:
    present = {n.op_type for n in proto.graph.node}
    if step.op_types is not None:
        chosen = sorted(present & set(step.op_types))
        if not chosen:
            raise UnsupportedModel(f"none of the requested op_types ({', '.join(step.op_types)}) is in this model; "
                                   f"it has {', '.join(sorted(present))}")
        return chosen, {}
    skipped = dict.fromkeys(sorted(present & NO_INT8_KERNEL), "no integer kernel on CPU")
    chosen = sorted(present & set(QDQRegistry) - NO_INT8_KERNEL)
    if not chosen or not constant_names(proto) & {i for n in proto.graph.node if n.op_type in chosen
                                                 for i in n.input}:
        raise UnsupportedModel("static quantization found no layer with weights to quantize (Conv, MatMul, Gemm, "
                               f"Gather); this model has {', '.join(sorted(present))}")
    return chosen, skipped


def _nonfinite_nodes(proto: onnx.ModelProto, op_types: list[str], feeds: dict[str, np.ndarray],
                     workdir: Path) -> tuple[dict[str, str], set[str]]:
    """Candidate nodes touching inf/NaN (a -inf attention mask, say), which no int8 range can hold."""
    candidates = [n for n in proto.graph.node if n.op_type in op_types]
    tensors = {t for n in candidates for t in [*n.input, *n.output] if t}
    bad = nonfinite_tensors(proto, tensors, feeds, workdir)
    constant_readers = nonfinite_constant_consumers(proto)
    excluded = {n.name: f"reads constant '{constant_readers[n.name]}' holding inf/NaN or a mask value"
                for n in candidates if n.name in constant_readers}
    for node in candidates:
        touched = sorted(bad & {*node.input, *node.output})
        if touched and node.name not in excluded:
            excluded[node.name] = f"tensor '{touched[0]}' holds inf/NaN or mask values on calibration data"
    return excluded, bad


def _sensitive_nodes(proto: onnx.ModelProto, op_types: list[str]) -> dict[str, str]:
    constants = constant_names(proto)
    found = {n.name: f"sensitive op type {n.op_type}" for n in proto.graph.node
             if n.op_type in SENSITIVE_OPS and n.op_type in op_types}
    for node in proto.graph.node:  # attention scores and context: two activations, both quantized
        if node.op_type == "MatMul" and "MatMul" in op_types and not constants & set(node.input):
            found[node.name] = "MatMul of two activations (attention)"
    return found


def _worst_nodes(float_model: Path, attempt: Attempt, data: ModelData, workdir: Path) -> dict[str, str]:
    """Per-node sensitivity: the quantized nodes whose output error grows most over their inputs' error."""
    qdq = graph.load(attempt.path)
    quantized = _quantized_nodes(qdq)
    float_proto = graph.load(float_model)
    produced = {o for n in float_proto.graph.node for o in n.output} | {i.name for i in float_proto.graph.input}
    dequantized = _dequantized_names(qdq)
    pairs: dict[str, tuple[str, str]] = {}  # float tensor -> (its value in the float model, in the QDQ model)
    watched: dict[str, tuple[str, list[str]]] = {}
    for node in float_proto.graph.node:
        if node.name not in quantized or node.name in attempt.excluded:
            continue
        # QDQ folds a following Relu into the Q/DQ pair and may rename the output; compare what the next node sees.
        out = quantized[node.name].output[0]
        seen = dequantized.get(out, out)
        out_float = out if out in produced else seen
        pairs[out_float] = (out_float, seen)
        for name in node.input:
            if name in produced:
                pairs.setdefault(name, (name, dequantized.get(name, name)))
        watched[node.name] = (out_float, [i for i in node.input if i in produced])
    if not watched:
        return {}
    feeds = next(data.take(min(len(data), 32)).batches(32))
    errors = _tensor_errors(float_model, attempt.path, pairs, feeds, workdir)
    growth = {name: errors[out] - max((errors.get(i, 0.0) for i in ins), default=0.0)
              for name, (out, ins) in watched.items() if out in errors}
    worst = sorted(growth, key=lambda name: growth[name], reverse=True)
    count = max(1, int(len(worst) * _PER_NODE_SHARE))
    return {name: f"per-node sensitivity: adds {growth[name]:.3g} relative error" for name in worst[:count]
            if growth[name] > 0}


def _quantized_nodes(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Nodes given dequantized (int8) inputs in a QDQ model; the quantizer keeps the original node names."""
    dequantized = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name: n for n in proto.graph.node
            if n.op_type != "QuantizeLinear" and n.output and dequantized & set(n.input)}


def _dequantized_names(proto: onnx.ModelProto) -> dict[str, str]:
    """Tensor -> the DequantizeLinear output that carries its quantized value, where it was quantized."""
    quantized_by = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    return {quantized_by[n.input[0]]: n.output[0] for n in proto.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in quantized_by}


def _tensor_errors(float_model: Path, quantized: Path, pairs: dict[str, tuple[str, str]],
                   feeds: dict[str, np.ndarray], workdir: Path) -> dict[str, float]:
    """Relative L2 error of each tensor, its QDQ-model value against its float-model value."""
    reference = _probe(float_model, {f for f, _ in pairs.values()}, feeds, workdir / "probe-float.onnx")
    got = _probe(quantized, {q for _, q in pairs.values()}, feeds, workdir / "probe-qdq.onnx")
    errors = {}
    for name, (float_name, qdq_name) in pairs.items():
        ref, value = reference.get(float_name), got.get(qdq_name)
        if ref is not None and value is not None and ref.shape == value.shape:
            errors[name] = float(np.linalg.norm(value - ref) / max(float(np.linalg.norm(ref)), 1e-12))
    return errors


def _probe(path: Path, names: set[str], feeds: dict[str, np.ndarray], target: Path) -> dict[str, np.ndarray]:
    proto = graph.load(path)
    inferred = graph.infer_shapes(proto)
    produced = {o for n in proto.graph.node for o in n.output}  # value_info may name tensors QDQ removed
    typed = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output] if v.name in produced}
    wanted = sorted(n for n in names if n in typed and typed[n].type.tensor_type.elem_type == onnx.TensorProto.FLOAT)
    present = {o.name for o in proto.graph.output}
    proto.graph.output.extend(typed[n] for n in wanted if n not in present)
    values = graph.session(graph.save(proto, target)).run(wanted, feeds)
    return {name: np.asarray(value, dtype=np.float64) for name, value in zip(wanted, values, strict=True)}


def _good(attempt: Attempt) -> bool:
    return attempt.fidelity is not None and attempt.fidelity.meets(MIN_COSINE, MIN_AGREEMENT)


def _choose(attempts: list[Attempt]) -> Attempt:
    """The first attempt that meets the target (it quantizes the most); else the most faithful."""
    good = [a for a in attempts if _good(a)]
    if good:
        return good[0]
    return max(attempts, key=_score)
