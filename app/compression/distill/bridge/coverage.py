"""What the training bridge can run, known without importing torch: the server checks a recipe at submission.

`SUPPORTED` lists every op the bridge's tables implement (a test keeps it equal to them); `problems` names
configurations of a known op that it cannot run; `unsupported` walks a whole model and names everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"

# ONNX element types the bridge holds as torch tensors.
DTYPE_CODES = frozenset({
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT8,
    TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8, TensorProto.BOOL,
})

SUPPORTED = frozenset({
    "Abs", "Add", "And", "ArgMax", "ArgMin", "AveragePool", "BatchNormalization", "Cast", "CastLike", "Ceil",
    "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "CumSum",
    "DepthToSpace", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor",
    "GRU", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool",
    "Greater", "GreaterOrEqual", "GroupNormalization", "HardSigmoid", "HardSwish", "Identity",
    "QuantizeLinear", "DequantizeLinear",
    "InstanceNormalization", "IsInf", "IsNaN", "LSTM", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual",
    "Log", "LogSoftmax", "LpNormalization", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mish", "Mod", "Mul",
    "Neg", "Not", "OneHot", "Or", "PRelu", "Pad", "Pow", "RNN", "Range", "Reciprocal", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "Round", "ScatterElements", "ScatterND", "Selu", "Shape",
    "Sigmoid", "Sign", "SimplifiedLayerNormalization", "Sin", "Size", "Slice", "Softmax", "Softplus",
    "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tanh", "Tile", "TopK", "Transpose",
    "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
    f"{MS_DOMAIN}.Attention", f"{MS_DOMAIN}.BiasGelu",
    f"{MS_DOMAIN}.EmbedLayerNormalization", f"{MS_DOMAIN}.FastGelu", f"{MS_DOMAIN}.FusedConv",
    f"{MS_DOMAIN}.FusedGemm", f"{MS_DOMAIN}.FusedMatMul", f"{MS_DOMAIN}.Gelu", f"{MS_DOMAIN}.MultiHeadAttention",
    f"{MS_DOMAIN}.QuickGelu", f"{MS_DOMAIN}.SkipLayerNormalization", f"{MS_DOMAIN}.SkipSimplifiedLayerNormalization",
})

# FusedConv / FusedGemm activations the bridge implements.
ACTIVATIONS = ("", "Identity", "Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "Clip")
RESIZE_MODES = {
    "nearest": ("half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "tf_half_pixel_for_nn"),
    "linear": ("half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"),
}


@dataclass(frozen=True, eq=False)
class Node:
    op_type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]
    opset: int
    """The default-domain opset of the model: several ops moved attributes to inputs over the versions."""
    domain: str = ""

    @property
    def key(self) -> str:
        """The op tables' key: the bare op type in the default domain, else `domain.op_type`."""
        return f"{self.domain}.{self.op_type}" if self.domain not in ("", "ai.onnx") else self.op_type

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)


def attribute_value(attribute: AttributeProto) -> Any:
    value = helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode() for v in value]
    return value


def make_node(proto: onnx.NodeProto, opset: int) -> Node:
    attrs = {a.name: attribute_value(a) for a in proto.attribute}
    return Node(proto.op_type, proto.name, tuple(proto.input), tuple(proto.output), attrs, opset, proto.domain)


def opset_of(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return int(onnx.defs.onnx_opset_version())


def problems(node: Node) -> str | None:
    """A reason the bridge cannot run this node although it knows its op type, or None."""
    if node.domain == MS_DOMAIN:
        return _contrib_problems(node)
    if node.op_type == "BatchNormalization" and node.attr("training_mode", 0):
        return "BatchNormalization(training_mode=1)"
    if node.op_type == "MaxPool" and len(node.outputs) > 1 and node.outputs[1]:
        return "MaxPool(with indices)"
    if node.op_type == "AveragePool" and any(d != 1 for d in node.attr("dilations", [])):
        return "AveragePool(dilations)"
    if node.op_type == "Pad" and node.attr("mode", "constant") not in ("constant", "reflect", "edge", "wrap"):
        return f"Pad(mode={node.attr('mode')})"
    if node.op_type in ("Conv", "ConvTranspose", "MaxPool", "AveragePool"):
        kernel = node.attr("kernel_shape")
        if kernel is not None and not 1 <= len(kernel) <= 3:
            return f"{node.op_type}({len(kernel)}-D)"
    if node.op_type in ("Resize", "Upsample"):
        mode = str(node.attr("mode", "nearest"))
        transform = str(node.attr("coordinate_transformation_mode", "half_pixel" if node.opset >= 11
                                  else "asymmetric"))
        if node.op_type == "Upsample" or node.opset < 11:
            transform = "asymmetric"
        if mode not in RESIZE_MODES or transform not in RESIZE_MODES[mode]:
            return f"{node.op_type}(mode={mode}, coordinate_transformation_mode={transform})"
        if node.attr("antialias", 0) or node.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
            return f"{node.op_type}(antialias or keep_aspect_ratio_policy)"
    if node.op_type in ("LSTM", "GRU", "RNN"):
        if node.attr("clip") is not None or node.attr("input_forget", 0):
            return f"{node.op_type}(clip or input_forget)"
        defaults = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
        activations = list(node.attr("activations", []))
        expected = defaults[node.op_type] * (2 if node.attr("direction", "forward") == "bidirectional" else 1)
        if activations and activations != expected:
            return f"{node.op_type}(activations={','.join(activations)})"
    return None


def _contrib_problems(node: Node) -> str | None:
    if node.op_type in ("FusedConv", "FusedGemm") and str(node.attr("activation", "")) not in ACTIVATIONS:
        return f"{MS_DOMAIN}.{node.op_type}(activation={node.attr('activation')})"
    if node.op_type == "FusedMatMul" and (node.attr("transBatchA", 0) or node.attr("transBatchB", 0)):
        return f"{MS_DOMAIN}.FusedMatMul(transBatch)"
    if node.op_type in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization") \
            and len(node.outputs) > 1 and any(node.outputs[1:3]):
        return f"{MS_DOMAIN}.{node.op_type}(mean/inv_std_var outputs)"
    if node.op_type in ("Attention", "MultiHeadAttention"):
        past = node.inputs[4:5] if node.op_type == "Attention" else node.inputs[6:]
        if any(past) or any(node.outputs[1:]) or node.attr("unidirectional", 0):
            return f"{MS_DOMAIN}.{node.op_type}(past state or causal)"
        if node.op_type == "MultiHeadAttention" and len(node.inputs) > 3 and node.inputs[3]:
            return f"{MS_DOMAIN}.MultiHeadAttention(bias input)"
    if node.op_type == "EmbedLayerNormalization" and len(node.outputs) > 2 and node.outputs[2]:
        return f"{MS_DOMAIN}.EmbedLayerNormalization(embedding_sum output)"
    return None


def unsupported(model: onnx.ModelProto) -> list[str]:
    """Everything in `model` the bridge cannot run, by name: op types, op configurations, element types."""
    opset = opset_of(model)
    missing: set[str] = set()
    for proto in model.graph.node:
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in proto.attribute):
            missing.add(f"{proto.op_type}(subgraph)")
            continue
        node = make_node(proto, opset)
        if node.key not in SUPPORTED:
            missing.add(node.key)
        elif node.key == "Cast" and int(node.attr("to", 0)) not in DTYPE_CODES:
            missing.add(f"Cast(to={helper.tensor_dtype_to_string(int(node.attr('to', 0)))})")
        else:
            reason = problems(node)
            if reason:
                missing.add(reason)
    for tensor in model.graph.initializer:
        if tensor.data_type not in DTYPE_CODES:
            missing.add(f"initializer dtype {helper.tensor_dtype_to_string(tensor.data_type)}")
    if model.graph.sparse_initializer:
        missing.add("sparse initializers")
    return sorted(missing)
