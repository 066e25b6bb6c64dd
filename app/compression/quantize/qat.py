"""Quantization-aware training: a static INT8 QDQ model fine-tuned against the original's outputs.

The QDQ graph's int8 weights become float weights behind a QuantizeLinear with the calibrated scale and zero
point (fake quantization), the training bridge runs it with straight-through rounding, and distillation trains
those float weights on the original's outputs (and the float parts it kept: biases, norms). Each weight is then
rounded back onto its int8 grid, so the result has exactly the QDQ model's structure, scales and speed; only which
integer each weight holds has changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from app.compression import graph
from app.compression.config import DistillStep, QatConfig
from app.compression.context import StepContext
from app.compression.errors import DataRequired, UnsupportedModel

_INTEGER_WEIGHTS = {onnx.TensorProto.INT8: (-128, 127, np.int8), onnx.TensorProto.UINT8: (0, 255, np.uint8)}


@dataclass(frozen=True)
class _Weight:
    quantized: str
    """The int8 initializer the DequantizeLinear read."""
    shadow: str
    """The float initializer training updates."""
    node: str
    """The QuantizeLinear put in front of the DequantizeLinear."""


def finetune(qdq: Path, output: Path, config: QatConfig, ctx: StepContext) -> dict[str, Any]:
    if ctx.train is None or ctx.train.source == "synthetic":
        raise DataRequired("quantization-aware training learns from the original's outputs on real inputs: upload "
                           "a dataset for this model")
    from app.compression.distill import run as distill  # torch loads only when QAT is asked for

    model = graph.load(qdq)
    weights = _fake_quantized(model)
    if not weights:
        raise UnsupportedModel("quantization-aware training found no int8 weight behind a DequantizeLinear")
    fake = ctx.workdir / "qat-fake-quantized.onnx"
    graph.save(model, fake)
    trained = ctx.workdir / "qat-trained.onnx"
    step = DistillStep(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, patience=config.epochs,
                       hidden_states=False)
    notes = distill(fake, trained, step, ctx)
    result = graph.load(trained)
    changed = _requantized(result, weights, graph.load(qdq))
    graph.save(result, output)
    return {"epochs_run": notes["epochs_run"], "best_epoch": notes["best_epoch"], "lr": config.lr,
            "validation_loss_before": notes["validation_loss_before"], "validation_loss": notes["validation_loss"],
            "weights_trained": len(weights), "weights_changed_share": changed, "samples": notes["samples"],
            "seconds": notes["seconds"]}


def _fake_quantized(model: onnx.ModelProto) -> list[_Weight]:
    """DequantizeLinear(int8 W) becomes DequantizeLinear(QuantizeLinear(float W)), in place."""
    tensors = {t.name: t for t in model.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    weights: list[_Weight] = []
    for node in model.graph.node:
        source = tensors.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if source is None or source.data_type not in _INTEGER_WEIGHTS or len(node.input) < 3 \
                or node.input[2] not in tensors:
            nodes.append(node)
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        values = numpy_helper.to_array(source).astype(np.float32)
        scale = numpy_helper.to_array(tensors[node.input[1]]).astype(np.float32)
        zero = numpy_helper.to_array(tensors[node.input[2]]).astype(np.float32)
        shadow = f"{source.name}.qat_float"
        model.graph.initializer.append(numpy_helper.from_array(
            ((values - _along(zero, axis, values.ndim)) * _along(scale, axis, values.ndim)).astype(np.float32),
            shadow))
        quantize = helper.make_node("QuantizeLinear", [shadow, node.input[1], node.input[2]],
                                    [f"{source.name}.qat_quantized"], name=f"{source.name}/qat_quantize")
        if scale.size > 1:
            quantize.attribute.append(helper.make_attribute("axis", axis))
        nodes.append(quantize)
        node.input[0] = quantize.output[0]
        nodes.append(node)
        weights.append(_Weight(source.name, shadow, quantize.name))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [t for t in model.graph.initializer if t.name not in {w.quantized for w in weights}]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return weights


def _requantized(model: onnx.ModelProto, weights: list[_Weight], before: onnx.ModelProto) -> float:
    """Trained float weights rounded back onto their int8 grid; returns the share of integers that changed."""
    tensors = {t.name: t for t in model.graph.initializer}
    original = {t.name: t for t in before.graph.initializer}
    by_node = {w.node: w for w in weights}
    nodes: list[onnx.NodeProto] = []
    integer_of: dict[str, str] = {}  # fake-quantized weight -> its int8 initializer
    changed = total = 0
    for node in model.graph.node:
        weight = by_node.get(node.name)
        if weight is None:
            nodes.append(node)
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        values = numpy_helper.to_array(tensors[weight.shadow]).astype(np.float32)
        scale = numpy_helper.to_array(tensors[node.input[1]]).astype(np.float32)
        zero_tensor = tensors[node.input[2]]
        low, high, dtype = _INTEGER_WEIGHTS[zero_tensor.data_type]
        zero = numpy_helper.to_array(zero_tensor).astype(np.float32)
        integers = np.clip(np.rint(values / _along(scale, axis, values.ndim)) + _along(zero, axis, values.ndim),
                           low, high).astype(dtype)
        before_values = numpy_helper.to_array(original[weight.quantized])
        changed, total = changed + int(np.count_nonzero(integers != before_values)), total + integers.size
        model.graph.initializer.append(numpy_helper.from_array(integers, weight.quantized))
        integer_of[node.output[0]] = weight.quantized
    for node in nodes:  # each DequantizeLinear reads its integers again
        for position, name in enumerate(node.input):
            if name in integer_of:
                node.input[position] = integer_of[name]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    shadows = {w.shadow for w in weights}
    kept = [t for t in model.graph.initializer if t.name not in shadows]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return round(changed / max(total, 1), 6)


def _along(value: np.ndarray, axis: int, rank: int) -> np.ndarray:
    if value.size == 1:
        return value.reshape(())
    axis = axis + rank if axis < 0 else axis
    shape = [1] * rank
    shape[axis] = value.size
    return value.reshape(shape)
