"""ONNX operators as torch functions for the training bridge: layers (conv, pooling, norms, matmuls, softmax)
and reductions.

Normalizations use inference semantics: BatchNormalization normalizes with its running statistics, which stay
frozen buffers (distillation data is small and often differently distributed, so re-estimating them would hurt).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from app.compression.distill.bridge.coverage import Node
from app.compression.distill.bridge.ops import Inputs, OpFn, Tensor, axes_from, ints, need, optional_input, register

NN_OPS: dict[str, OpFn] = {}


def nn_op(*names: str) -> Callable[[OpFn], OpFn]:
    return register(NN_OPS, *names)


# ---- padding helpers ---------------------------------------------------------------------------------------------

def _auto_pads(node: Node, spatial: list[int], kernel: list[int], strides: list[int],
               dilations: list[int]) -> list[int]:
    """Explicit ONNX pads [begin..., end...] for a window op, resolving auto_pad SAME_* and VALID."""
    mode = str(node.attr("auto_pad", "NOTSET"))
    count = len(kernel)
    if mode == "VALID":
        return [0] * 2 * count
    if mode not in ("SAME_UPPER", "SAME_LOWER"):
        return [int(p) for p in node.attr("pads", [0] * 2 * count)]
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else large)
        end.append(large if mode == "SAME_UPPER" else small)
    return begin + end


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX [x1_begin, x2_begin, ..., x1_end, ...] to torch's last-dimension-first pairs."""
    count = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(count)):
        out += [pads[i], pads[i + count]]
    return out


def _window(node: Node, x: Tensor, kernel: list[int]) -> tuple[list[int], list[int], list[int]]:
    count = len(kernel)
    strides = [int(s) for s in node.attr("strides", [1] * count)]
    dilations = [int(d) for d in node.attr("dilations", [1] * count)]
    return strides, dilations, _auto_pads(node, list(x.shape[2:]), kernel, strides, dilations)


def _ceil_crop(y: Tensor, spatial: list[int], pads: list[int], strides: list[int]) -> Tensor:
    """With ceil_mode a last window may not start in the end padding; explicit pre-padding allowed that."""
    for i, (size, stride) in enumerate(zip(spatial, strides, strict=True)):
        out = y.shape[2 + i]
        while out > 1 and (out - 1) * stride >= size + pads[i]:
            out -= 1
        y = y.narrow(2 + i, 0, out)
    return y


# ---- convolutions ------------------------------------------------------------------------------------------------

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@nn_op("Conv")
def _conv(node: Node, xs: Inputs) -> list[Tensor]:
    x, w, b = need(xs[0]), need(xs[1]), optional_input(xs, 2)
    kernel = list(w.shape[2:])
    strides, dilations, pads = _window(node, x, kernel)
    count = len(kernel)
    padding: list[int] = pads[:count]
    if pads[:count] != pads[count:]:  # torch pads symmetrically; pad asymmetric cases explicitly
        x, padding = F.pad(x, _torch_pad(pads)), [0] * count
    return [_CONV[count](x, w, b, strides, padding, dilations, int(node.attr("group", 1)))]


@nn_op("ConvTranspose")
def _conv_transpose(node: Node, xs: Inputs) -> list[Tensor]:
    x, w, b = need(xs[0]), need(xs[1]), optional_input(xs, 2)
    count = w.dim() - 2
    strides = [int(s) for s in node.attr("strides", [1] * count)]
    dilations = [int(d) for d in node.attr("dilations", [1] * count)]
    extra = [int(p) for p in node.attr("output_padding", [0] * count)]
    group = int(node.attr("group", 1))
    # the full (unpadded) result, then ONNX's pads and output_padding as one crop/extend of its borders
    y = _CONV_T[count](x, w, None, strides, 0, 0, group, dilations)
    full = list(y.shape[2:])
    mode = str(node.attr("auto_pad", "NOTSET"))
    wanted = node.attr("output_shape")
    if wanted is not None or mode in ("SAME_UPPER", "SAME_LOWER"):
        target = [int(v) for v in wanted[-count:]] if wanted is not None \
            else [size * s for size, s in zip(x.shape[2:], strides, strict=True)]
        begin, end = [], []
        for size, out, add in zip(full, target, extra, strict=True):
            total = size + add - out
            first = total // 2 if mode == "SAME_UPPER" else total - total // 2
            begin.append(first)
            end.append(total - first)
    else:
        pads = [0] * 2 * count if mode == "VALID" else [int(p) for p in node.attr("pads", [0] * 2 * count)]
        begin, end = pads[:count], pads[count:]
    y = F.pad(y, _torch_pad([-p for p in begin] + [a - p for a, p in zip(extra, end, strict=True)]))
    if b is not None:
        y = y + b.reshape(1, -1, *[1] * count)
    return [y]


# ---- pooling -----------------------------------------------------------------------------------------------------

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@nn_op("MaxPool")
def _max_pool(node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])
    kernel = [int(k) for k in node.attr("kernel_shape")]
    strides, dilations, pads = _window(node, x, kernel)
    spatial = list(x.shape[2:])
    if any(pads):  # torch limits padding to half the kernel; pad with the lowest value explicitly
        low = -math.inf if x.is_floating_point() else torch.iinfo(x.dtype).min
        x = F.pad(x, _torch_pad(pads), value=low)
    ceil = bool(node.attr("ceil_mode", 0))
    y = _MAX_POOL[len(kernel)](x, kernel, strides, 0, dilations, ceil)
    return [_ceil_crop(y, spatial, pads, strides) if ceil else y]


@nn_op("AveragePool")
def _avg_pool(node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])
    kernel = [int(k) for k in node.attr("kernel_shape")]
    strides, _dilations, pads = _window(node, x, kernel)
    ceil = bool(node.attr("ceil_mode", 0))
    pool = _AVG_POOL[len(kernel)]
    if not any(pads):
        return [pool(x, kernel, strides, 0, ceil)]
    padded = F.pad(x, _torch_pad(pads))
    if node.attr("count_include_pad", 0):
        y = pool(padded, kernel, strides, 0, ceil, True)
    else:  # excluding pads: divide by the pooled mask of real elements (the window divisor cancels out)
        mask = F.pad(torch.ones_like(x[:1, :1]), _torch_pad(pads))
        y = pool(padded, kernel, strides, 0, ceil) / pool(mask, kernel, strides, 0, ceil)
    return [_ceil_crop(y, list(x.shape[2:]), pads, strides) if ceil else y]


@nn_op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])
    dims = list(range(2, x.dim()))
    if node.op_type == "GlobalAveragePool":
        return [x.mean(dim=dims, keepdim=True)]
    return [torch.amax(x, dim=dims, keepdim=True)]


@nn_op("Pad")
def _pad(node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])
    pads = ints(optional_input(xs, 1)) if node.opset >= 11 else [int(p) for p in node.attr("pads")]
    axes = [a % x.dim() for a in ints(optional_input(xs, 3))] or list(range(x.dim()))
    full = [0] * 2 * x.dim()
    for i, axis in enumerate(axes):
        full[axis], full[axis + x.dim()] = pads[i], pads[i + len(axes)]
    torch_pads = _torch_pad(full)
    while torch_pads and not any(torch_pads[-2:]):  # torch's non-constant modes pad only trailing dims
        torch_pads = torch_pads[:-2]
    mode = str(node.attr("mode", "constant"))
    if mode != "constant":
        return [F.pad(x, torch_pads, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])]
    fill = optional_input(xs, 2)
    value = fill.item() if fill is not None and fill.numel() else float(node.attr("value", 0.0))
    return [F.pad(x, torch_pads, value=value)]


# ---- normalization -----------------------------------------------------------------------------------------------

@nn_op("BatchNormalization")
def _batch_norm(node: Node, xs: Inputs) -> list[Tensor]:
    x, scale, bias, mean, var = (need(t) for t in xs[:5])
    eps = float(node.attr("epsilon", 1e-5))
    return [F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)]


@nn_op("InstanceNormalization")
def _instance_norm(node: Node, xs: Inputs) -> list[Tensor]:
    x, scale, bias = need(xs[0]), need(xs[1]), need(xs[2])
    return [F.instance_norm(x, weight=scale, bias=bias, eps=float(node.attr("epsilon", 1e-5)))]


@nn_op("LayerNormalization")
def _layer_norm(node: Node, xs: Inputs) -> list[Tensor]:
    x, scale, bias = need(xs[0]), need(xs[1]), optional_input(xs, 2)
    axis = int(node.attr("axis", -1)) % x.dim()
    eps = float(node.attr("epsilon", 1e-5))
    shape = tuple(x.shape[axis:])
    if len(node.outputs) == 1 and tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        return [F.layer_norm(x, shape, scale, bias, eps)]
    dims = list(range(axis, x.dim()))  # broadcast scale/bias, or Mean/InvStdDev outputs requested
    mean = x.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt((x - mean).pow(2).mean(dim=dims, keepdim=True) + eps)
    y = (x - mean) * inv_std * scale
    y = y if bias is None else y + bias
    return [y, mean, inv_std][:len(node.outputs)]


@nn_op("SimplifiedLayerNormalization")
def _rms_norm(node: Node, xs: Inputs) -> list[Tensor]:
    x, scale = need(xs[0]), need(xs[1])
    dims = list(range(int(node.attr("axis", -1)) % x.dim(), x.dim()))
    inv_rms = torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + float(node.attr("epsilon", 1e-5)))
    return [x * inv_rms * scale, inv_rms][:len(node.outputs)]


@nn_op("GroupNormalization")
def _group_norm(node: Node, xs: Inputs) -> list[Tensor]:
    x, scale, bias = need(xs[0]), need(xs[1]), need(xs[2])
    groups, channels = int(node.attr("num_groups")), x.shape[1]
    grouped = x.reshape(x.shape[0], groups, -1)
    mean = grouped.mean(dim=-1, keepdim=True)
    var = (grouped - mean).pow(2).mean(dim=-1, keepdim=True)
    y = ((grouped - mean) * torch.rsqrt(var + float(node.attr("epsilon", 1e-5)))).reshape(x.shape)
    if scale.numel() == groups and groups != channels:  # opset 18 scales per group, opset 21 per channel
        scale, bias = scale.repeat_interleave(channels // groups), bias.repeat_interleave(channels // groups)
    view = (1, channels) + (1,) * (x.dim() - 2)
    return [y * scale.reshape(view) + bias.reshape(view)]


@nn_op("LpNormalization")
def _lp_norm(node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])
    return [F.normalize(x, p=float(node.attr("p", 2)), dim=int(node.attr("axis", -1)), eps=0.0)]


# ---- reductions --------------------------------------------------------------------------------------------------

def _reduce_all(x: Tensor, dims: list[int], keep: bool, fn: Callable[[Tensor, int], Tensor]) -> Tensor:
    for dim in sorted(dims, reverse=True):
        x = fn(x, dim)
        x = x if keep else x.squeeze(dim)
    return x


_REDUCERS: dict[str, Callable[[Tensor, list[int], bool], Tensor]] = {
    "ReduceSum": lambda x, d, k: x.sum(dim=d, keepdim=k),
    "ReduceMean": lambda x, d, k: x.mean(dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceProd": lambda x, d, k: _reduce_all(x, d, k, lambda t, i: t.prod(dim=i, keepdim=True)),
    "ReduceL1": lambda x, d, k: x.abs().sum(dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt((x * x).sum(dim=d, keepdim=k)),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(dim=d, keepdim=k),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: torch.log(x.sum(dim=d, keepdim=k)),
}


@nn_op(*_REDUCERS)
def _reduce(node: Node, xs: Inputs) -> list[Tensor]:
    x, axes = need(xs[0]), axes_from(node, xs, 1)
    if not axes:
        if node.attr("noop_with_empty_axes", 0):
            return [x]
        axes = list(range(x.dim()))
    dims = sorted({a % x.dim() for a in axes}) if x.dim() else []
    if not dims:
        return [x]
    return [_REDUCERS[node.op_type](x, dims, bool(node.attr("keepdims", 1)))]


# ---- matrix products and softmax ---------------------------------------------------------------------------------

@nn_op("MatMul")
def _matmul(_node: Node, xs: Inputs) -> list[Tensor]:
    return [torch.matmul(need(xs[0]), need(xs[1]))]


@nn_op("Gemm")
def _gemm(node: Node, xs: Inputs) -> list[Tensor]:
    a, b, c = need(xs[0]), need(xs[1]), optional_input(xs, 2)
    a = a.t() if node.attr("transA", 0) else a
    b = b.t() if node.attr("transB", 0) else b
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    y = a @ b if alpha == 1.0 else alpha * (a @ b)  # skip no-op scalings: keeps results bit-close to onnxruntime
    if c is not None:
        y = y + (c if beta == 1.0 else beta * c)
    return [y]


@nn_op("Softmax", "LogSoftmax")
def _softmax(node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])
    fn = torch.softmax if node.op_type == "Softmax" else torch.log_softmax
    if node.opset >= 13:
        return [fn(x, int(node.attr("axis", -1)))]
    axis = int(node.attr("axis", 1)) % x.dim()  # before 13: coerced to 2-D at axis
    flat = x.reshape(math.prod(x.shape[:axis]), -1)
    return [fn(flat, 1).reshape(x.shape)]
