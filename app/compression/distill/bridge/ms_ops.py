"""onnxruntime's com.microsoft fusions as torch functions, so a model saved by the optimize step still trains.

Only the fusions onnxruntime's basic/extended levels write for CPU graphs are covered; layout-specific ones
(nchwc, written at the 'all' level) are not, and the bridge names them when it refuses a graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from app.compression.distill.bridge.nn_ops import NN_OPS
from app.compression.distill.bridge.ops import Inputs, Node, OpFn, Tensor, need, optional_input, register

DOMAIN = "com.microsoft"
MS_OPS: dict[str, OpFn] = {}


def ms_op(*names: str) -> Callable[[OpFn], OpFn]:
    return register(MS_OPS, *[f"{DOMAIN}.{name}" for name in names])


def _activation(name: str, params: list[float]) -> Callable[[Tensor], Tensor]:
    if name == "Relu":
        return torch.relu
    if name == "Sigmoid":
        return torch.sigmoid
    if name == "Tanh":
        return torch.tanh
    if name == "LeakyRelu":
        return lambda x: F.leaky_relu(x, params[0] if params else 0.01)
    if name == "HardSigmoid":
        alpha, beta = (params + [0.2, 0.5][len(params):])[:2]
        return lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0)
    if name == "Clip":
        low, high = (params + [float("-inf"), float("inf")][len(params):])[:2]
        return lambda x: torch.clamp(x, low, high)
    if name in ("", "Identity"):
        return lambda x: x
    raise ValueError(f"activation {name} is not supported")


_ACTIVATIONS = ("", "Identity", "Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "Clip")


def problems(node: Node) -> str | None:
    """A reason the bridge cannot run this contrib node, or None."""
    if str(node.attr("activation", "")) not in _ACTIVATIONS:
        return f"{DOMAIN}.{node.op_type}(activation={node.attr('activation')})"
    if node.op_type == "FusedMatMul" and (node.attr("transBatchA", 0) or node.attr("transBatchB", 0)):
        return f"{DOMAIN}.FusedMatMul(transBatch)"
    if node.op_type == "SkipLayerNormalization" and len(node.outputs) > 1 and any(node.outputs[1:3]):
        return f"{DOMAIN}.SkipLayerNormalization(mean/inv_std_var outputs)"
    return None


@ms_op("FusedConv")
def _fused_conv(node: Node, xs: Inputs) -> list[Tensor]:
    y = NN_OPS["Conv"](node, xs[:3])[0]
    z = optional_input(xs, 3)  # an Add folded in before the activation (residual connections)
    y = y if z is None else y + z
    return [_activation(str(node.attr("activation", "")), list(node.attr("activation_params", [])))(y)]


@ms_op("FusedGemm")
def _fused_gemm(node: Node, xs: Inputs) -> list[Tensor]:
    y = NN_OPS["Gemm"](node, xs)[0]
    params = [float(node.attr(k)) for k in ("activation_alpha", "activation_beta") if node.attr(k) is not None]
    return [_activation(str(node.attr("activation", "")), params)(y)]


@ms_op("FusedMatMul")
def _fused_matmul(node: Node, xs: Inputs) -> list[Tensor]:
    a, b = need(xs[0]), need(xs[1])
    a = a.transpose(-1, -2) if node.attr("transA", 0) else a
    b = b.transpose(-1, -2) if node.attr("transB", 0) else b
    alpha = float(node.attr("alpha", 1.0))
    y = torch.matmul(a, b)
    return [y if alpha == 1.0 else alpha * y]


@ms_op("SkipLayerNormalization")
def _skip_layer_norm(node: Node, xs: Inputs) -> list[Tensor]:
    x, skip, gamma = need(xs[0]), need(xs[1]), need(xs[2])
    beta, bias = optional_input(xs, 3), optional_input(xs, 4)
    total = x + skip if bias is None else x + skip + bias
    y = F.layer_norm(total, (total.shape[-1],), gamma, beta, float(node.attr("epsilon", 1e-12)))
    outputs = [y, y, y, total][:len(node.outputs)]  # mean/inv_std outputs are refused up front (problems)
    return outputs
