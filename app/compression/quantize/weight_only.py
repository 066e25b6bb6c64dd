"""Weight-only INT8 for convolutions: int8 weights in the file, float compute at run time.

onnxruntime's integer convolution (ConvInteger, what dynamic quantization writes for Conv) measured 4-12x slower
than float Conv on the CPUs here. Storing Conv weights as int8 with a per-output-channel scale behind a
DequantizeLinear keeps a quarter of their bytes in the file; with `session.disable_quant_qdq` onnxruntime folds
each DequantizeLinear into a float weight once, when it loads the model, so inference runs at float speed
(without it the dequantization would run on every call). The model records that entry for whoever serves it
(`graph.SESSION_CONFIG_KEY`); memory once loaded is that of the float model.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from app.compression import graph

SESSION_CONFIG = {"session.disable_quant_qdq": "1"}
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)


def convolution_weights(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Conv (and ungrouped ConvTranspose) nodes whose weight is a float initializer."""
    floats = {t.name for t in model.graph.initializer if t.data_type in _FLOATS and len(t.dims) >= 3}
    return [n for n in model.graph.node if n.domain in ("", "ai.onnx") and len(n.input) > 1 and n.input[1] in floats
            and (n.op_type == "Conv" or (n.op_type == "ConvTranspose" and _group(n) == 1))]


def quantize_convolution_weights(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite every convolution weight as DequantizeLinear(int8, per-channel scale); returns counts."""
    targets = convolution_weights(model)
    if not targets:
        return {"weights": 0, "bytes_before": 0, "bytes_after": 0}
    if graph.default_opset(model) < 13:
        raise ValueError("per-channel DequantizeLinear needs opset 13 (the normalize step raises it)")
    initializers = {t.name: t for t in model.graph.initializer}
    uses = Counter(name for n in graph.all_nodes(model) for name in n.input)
    dequantized: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    before = after = 0
    for node in model.graph.node:
        if node in targets:
            name = node.input[1]
            if name not in dequantized:
                axis = 0 if node.op_type == "Conv" else 1
                weight = numpy_helper.to_array(initializers[name]).astype(np.float32)
                quantized, scale = _symmetric_int8(weight, axis)
                base = f"{name}.int8"
                model.graph.initializer.extend([
                    numpy_helper.from_array(quantized, base), numpy_helper.from_array(scale, f"{base}.scale"),
                    numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{base}.zero_point")])
                new_nodes.append(helper.make_node("DequantizeLinear", [base, f"{base}.scale", f"{base}.zero_point"],
                                                  [f"{base}.dequantized"], name=f"{base}.dequantize", axis=axis))
                dequantized[name] = f"{base}.dequantized"
                before += weight.nbytes
                after += quantized.nbytes + scale.nbytes * 2
            uses[name] -= 1
            node.input[1] = dequantized[name]
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    unused = {name for name in dequantized if uses[name] <= 0}
    kept = [t for t in model.graph.initializer if t.name not in unused]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    graph.set_session_config(model, {**graph.session_config(model), **SESSION_CONFIG})
    return {"weights": len(dequantized), "bytes_before": before, "bytes_after": after}


def _symmetric_int8(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    channels = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    scale = (np.abs(channels).max(axis=1) / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0  # an all-zero channel: any scale reproduces it
    shape = [1] * weight.ndim
    shape[axis] = -1
    quantized = np.clip(np.round(weight / scale.reshape(shape)), -127, 127).astype(np.int8)
    return quantized, scale


def _group(node: onnx.NodeProto) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "group"), 1)
