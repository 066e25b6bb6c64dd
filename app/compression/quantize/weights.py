"""Which layers carry weights, the Gemm-to-MatMul rewrite, and counts of what was quantized."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from app.compression.quantize.calibrate import representable

MS_DOMAIN = "com.microsoft"
# FusedGemm activations that have a plain ONNX op of the same name (extended-level graphs carry them).
_GEMM_ACTIVATIONS = {"Relu", "Sigmoid", "Tanh", "LeakyRelu"}
_LOW_BIT_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4}
# Ops that compute on integers themselves, as opposed to float ops fed by DequantizeLinear.
INTEGER_OPS = {"MatMulInteger", "ConvInteger", "MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeMatMul",
               "QLinearMatMul", "QLinearConv", "QAttention", "DynamicQuantizeLSTM"}
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def weighted_nodes(model: onnx.ModelProto, kinds: set[str]) -> list[onnx.NodeProto]:
    """Nodes of `kinds` whose weight input (input 1; input 0 for Gather) is a float initializer."""
    floats = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) >= 2}
    found = []
    for node in model.graph.node:
        weight = 0 if node.op_type == "Gather" else 1
        if node.op_type in kinds and len(node.input) > weight and node.input[weight] in floats:
            found.append(node)
    return found


def gemm_to_matmul(model: onnx.ModelProto) -> list[str]:
    """Rewrite Gemm / FusedGemm with constant weights as MatMul + Add (+ activation), in place.

    Dynamic quantization has an integer kernel for MatMul only, so without this an MLP made of Gemm layers
    would quantize to nothing. Returns the names of the rewritten nodes.
    """
    initializers = {i.name: i for i in model.graph.initializer}
    uses = Counter(name for n in model.graph.node for name in n.input)
    rewritten: list[str] = []
    nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(model.graph.node):
        replacement = _gemm_replacement(node, index, initializers, uses, model.graph)
        if replacement is None:
            nodes.append(node)
            continue
        nodes.extend(replacement)
        rewritten.append(node.name)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return rewritten


def _gemm_replacement(node: onnx.NodeProto, index: int, initializers: dict[str, TensorProto],
                      uses: Counter[str], graph: onnx.GraphProto) -> list[onnx.NodeProto] | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    is_gemm = node.op_type == "Gemm" and node.domain in ("", "ai.onnx")
    is_fused = node.op_type == "FusedGemm" and node.domain == MS_DOMAIN
    activation = attrs.get("activation", b"").decode() if is_fused else ""
    if not (is_gemm or (is_fused and activation in _GEMM_ACTIVATIONS)):
        return None
    if attrs.get("transA", 0) or len(node.input) < 2 or node.input[1] not in initializers:
        return None
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    beta = float(attrs.get("beta", 1.0))
    if bias and beta != 1.0 and bias not in initializers:
        return None
    name = node.name or f"gemm_{index}"
    weight = numpy_helper.to_array(initializers[node.input[1]])
    weight = (weight.T if attrs.get("transB", 0) else weight) * np.float32(attrs.get("alpha", 1.0))
    weight_name = _replace_initializer(graph, initializers, uses, node.input[1], weight.astype(np.float32), name)
    out = node.output[0]
    product = f"{name}_matmul_out" if bias or activation else out
    new = [helper.make_node("MatMul", [node.input[0], weight_name], [product], name=f"{name}_matmul")]
    if bias:
        if beta != 1.0:
            scaled = numpy_helper.to_array(initializers[bias]) * np.float32(beta)
            bias = _replace_initializer(graph, initializers, uses, bias, scaled.astype(np.float32), f"{name}_bias")
        summed = f"{name}_add_out" if activation else out
        new.append(helper.make_node("Add", [product, bias], [summed], name=f"{name}_add"))
        product = summed
    if activation:
        act = helper.make_node(activation, [product], [out], name=f"{name}_{activation.lower()}")
        if activation == "LeakyRelu":
            act.attribute.append(helper.make_attribute("alpha", float(attrs.get("activation_alpha", 0.01))))
        new.append(act)
    return new


def _replace_initializer(graph: onnx.GraphProto, initializers: dict[str, TensorProto], uses: Counter[str],
                         name: str, value: np.ndarray, owner: str) -> str:
    """Overwrite an initializer only this node uses; otherwise add a new one beside it."""
    target = name if uses[name] == 1 else f"{owner}_{name}"
    tensor = numpy_helper.from_array(value, target)
    if target == name:
        initializers[name].CopyFrom(tensor)
        # Shape records of the old value (onnxruntime's saved graphs carry them) would now contradict it.
        for record in [r for r in graph.value_info if r.name == name]:
            graph.value_info.remove(record)
        for record in graph.input:  # IR < 4 lists initializers as inputs too
            if record.name == name:
                record.CopyFrom(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    elif target not in initializers:
        graph.initializer.append(tensor)
        initializers[target] = graph.initializer[-1]
    return target


def nonfinite_constant_consumers(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> constant it reads that holds inf, NaN or a mask-like extreme (no int8 range holds them)."""
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is not None:
            named = TensorProto()
            named.CopyFrom(value)
            named.name = node.output[0]
            tensors.append(named)
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    bad = {t.name for t in tensors if t.data_type in floats and not representable(numpy_helper.to_array(t))}
    return {n.name: next(i for i in n.input if i in bad) for n in model.graph.node if any(i in bad for i in n.input)}


def quantized_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Quantized compute nodes (integer ops, or float ops fed by DequantizeLinear) and low-bit weight tensors."""
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    nodes = sum(1 for n in model.graph.node
                if n.op_type in INTEGER_OPS or (n.op_type not in _QDQ_OPS and any(i in dequantized for i in n.input)))
    weights = sum(1 for i in model.graph.initializer if i.data_type in _LOW_BIT_TYPES and len(i.dims) >= 2)
    return {"quantized_nodes": nodes, "quantized_weights": weights}
