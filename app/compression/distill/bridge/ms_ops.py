"""onnxruntime's com.microsoft fusions as torch functions, so a model saved by the optimize step still trains.

Only the fusions onnxruntime's basic/extended levels write for CPU graphs are covered; layout-specific ones
(nchwc, written at the 'all' level) are not, and the bridge names them when it refuses a graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from app.compression.distill.bridge.coverage import MS_DOMAIN, Node
from app.compression.distill.bridge.nn_ops import NN_OPS
from app.compression.distill.bridge.ops import Inputs, OpFn, Tensor, need, optional_input, register

DOMAIN = MS_DOMAIN
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


@ms_op("SkipSimplifiedLayerNormalization")
def _skip_rms_norm(node: Node, xs: Inputs) -> list[Tensor]:
    x, skip, gamma, bias = need(xs[0]), need(xs[1]), need(xs[2]), optional_input(xs, 3)
    total = x + skip if bias is None else x + skip + bias
    inv_rms = torch.rsqrt(total.pow(2).mean(dim=-1, keepdim=True) + float(node.attr("epsilon", 1e-12)))
    y = total * inv_rms * gamma
    return [y, y, y, total][:len(node.outputs)]


@ms_op("Gelu")
def _gelu(_node: Node, xs: Inputs) -> list[Tensor]:
    return [F.gelu(need(xs[0]))]


@ms_op("BiasGelu")
def _bias_gelu(_node: Node, xs: Inputs) -> list[Tensor]:
    return [F.gelu(need(xs[0]) + need(xs[1]))]


@ms_op("FastGelu")
def _fast_gelu(_node: Node, xs: Inputs) -> list[Tensor]:
    x, bias = need(xs[0]), optional_input(xs, 1)
    return [F.gelu(x if bias is None else x + bias, approximate="tanh")]


@ms_op("QuickGelu")
def _quick_gelu(node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])
    return [x * torch.sigmoid(float(node.attr("alpha", 1.702)) * x)]


@ms_op("EmbedLayerNormalization")
def _embed_layer_norm(node: Node, xs: Inputs) -> list[Tensor]:
    ids, segments = need(xs[0]).long(), optional_input(xs, 1)
    words, positions, segment_table = need(xs[2]), need(xs[3]), optional_input(xs, 4)
    gamma, beta, mask, position_ids = need(xs[5]), need(xs[6]), optional_input(xs, 7), optional_input(xs, 8)
    where = position_ids.long() if position_ids is not None else torch.arange(ids.shape[1]).expand_as(ids)
    total = words[ids] + positions[where]
    if segments is not None and segment_table is not None:
        total = total + segment_table[segments.long()]
    y = F.layer_norm(total, (total.shape[-1],), gamma, beta, float(node.attr("epsilon", 1e-12)))
    # onnxruntime's mask index: the count of attended tokens per sequence (right padding), or zeros
    counts = mask.long().sum(dim=1) if mask is not None else torch.zeros(ids.shape[0], dtype=torch.long)
    return [y, counts.to(torch.int32)][:len(node.outputs)]


def _padding_bias(mask: Tensor | None, batch: int, keys: int, filter_value: float, dtype: torch.dtype) -> Tensor:
    """An additive [batch, 1, 1 or queries, keys] bias from a raw 0/1 mask or per-sequence lengths."""
    if mask is None:
        return torch.zeros((), dtype=dtype)
    if mask.dim() == 1 and mask.shape[0] == batch:  # lengths: keys at or past the length are padding
        keep = torch.arange(keys).unsqueeze(0) < mask.long().unsqueeze(1)
        return torch.where(keep, 0.0, filter_value).to(dtype).view(batch, 1, 1, keys)
    if mask.dim() == 2:
        return ((1 - mask.to(dtype)) * filter_value).view(batch, 1, 1, keys)
    if mask.dim() == 3:
        return ((1 - mask.to(dtype)) * filter_value).unsqueeze(1)
    raise ValueError(f"a mask of shape {tuple(mask.shape)} is not supported")


def _heads(x: Tensor, heads: int) -> Tensor:
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float | None, bias: Tensor) -> Tensor:
    scores = (q @ k.transpose(-1, -2)) * (scale if scale else q.shape[-1] ** -0.5) + bias
    context = torch.softmax(scores, dim=-1) @ v
    return context.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


@ms_op("Attention")
def _attention(node: Node, xs: Inputs) -> list[Tensor]:
    x, weights, bias = need(xs[0]), need(xs[1]), need(xs[2])
    heads = int(node.attr("num_heads"))
    sizes = [int(s) for s in node.attr("qkv_hidden_sizes", [])] or [weights.shape[1] // 3] * 3
    q, k, v = torch.split(x @ weights + bias, sizes, dim=-1)
    filter_value = float(node.attr("mask_filter_value", -10000.0))
    extra = _padding_bias(optional_input(xs, 3), x.shape[0], x.shape[1], filter_value, x.dtype)
    attention_bias = optional_input(xs, 5)
    if attention_bias is not None:
        extra = extra + attention_bias
    scale = float(node.attr("scale", 0.0)) or None
    return [_attend(_heads(q, heads), _heads(k, heads), _heads(v, heads), scale, extra)]


@ms_op("MultiHeadAttention")
def _multi_head_attention(node: Node, xs: Inputs) -> list[Tensor]:
    q, k, v = need(xs[0]), need(xs[1]), need(xs[2])
    heads = int(node.attr("num_heads"))
    filter_value = float(node.attr("mask_filter_value", -10000.0))
    extra = _padding_bias(optional_input(xs, 4), q.shape[0], k.shape[1], filter_value, q.dtype)
    attention_bias = optional_input(xs, 5)
    if attention_bias is not None:
        extra = extra + attention_bias
    scale = float(node.attr("scale", 0.0)) or None
    return [_attend(_heads(q, heads), _heads(k, heads), _heads(v, heads), scale, extra)]
