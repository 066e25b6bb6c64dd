"""ONNX operators as torch functions for the training bridge: elementwise and shape ops.

Each op takes the decoded node and its input tensors (None for an omitted optional input) and returns
its outputs in order. Shape-like inputs (Reshape's shape, Slice's starts) arrive as int64 tensors and are
read eagerly with `.tolist()`: the bridge runs eagerly, so dynamic shapes cost nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from onnx import TensorProto

from app.compression.distill.bridge.coverage import Node

Tensor = torch.Tensor
Inputs = list[Tensor | None]


OpFn = Callable[[Node, Inputs], Sequence[Tensor]]
OPS: dict[str, OpFn] = {}

TORCH_DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64, TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16, TensorProto.INT8: torch.int8, TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32, TensorProto.INT64: torch.int64, TensorProto.UINT8: torch.uint8,
    TensorProto.BOOL: torch.bool,
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision graphs run in float32: CPU torch mixes dtypes poorly, and training needs the precision."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def register(table: dict[str, OpFn], *names: str) -> Callable[[OpFn], OpFn]:
    def wrap(fn: OpFn) -> OpFn:
        for name in names:
            table[name] = fn
        return fn
    return wrap


def op(*names: str) -> Callable[[OpFn], OpFn]:
    return register(OPS, *names)


def ints(tensor: Tensor | None) -> list[int]:
    return [] if tensor is None else [int(v) for v in tensor.reshape(-1).tolist()]


def need(tensor: Tensor | None) -> Tensor:
    if tensor is None:
        raise ValueError("a required input is missing")
    return tensor


def optional_input(xs: Inputs, index: int) -> Tensor | None:
    return xs[index] if len(xs) > index else None


def axes_from(node: Node, xs: Inputs, index: int) -> list[int] | None:
    """Axes moved from an attribute to an input (Squeeze/Unsqueeze/ReduceSum at 13, other reductions at 18)."""
    tensor = optional_input(xs, index)
    if tensor is not None:
        return ints(tensor)
    value = node.attr("axes")
    return None if value is None else [int(a) for a in value]


# ---- elementwise ---------------------------------------------------------------------------------------------

_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Sqrt": torch.sqrt,
    "Neg": torch.neg, "Exp": torch.exp, "Log": torch.log, "Abs": torch.abs, "Reciprocal": torch.reciprocal,
    "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign, "Sin": torch.sin,
    "Cos": torch.cos, "Softsign": F.softsign, "Softplus": F.softplus, "Mish": F.mish, "HardSwish": F.hardswish,
    "Not": torch.logical_not, "IsNaN": torch.isnan, "Identity": lambda x: x,
}
_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Equal": torch.eq, "Less": torch.lt,
    "LessOrEqual": torch.le, "Greater": torch.gt, "GreaterOrEqual": torch.ge, "And": torch.logical_and,
    "Or": torch.logical_or, "Xor": torch.logical_xor,
}


def _unary(fn: Callable[[Tensor], Tensor]) -> OpFn:
    return lambda _node, xs: [fn(need(xs[0]))]


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    return lambda _node, xs: [fn(need(xs[0]), need(xs[1]))]


for _name, _fn in _UNARY.items():
    OPS[_name] = _unary(_fn)
for _name, _fn2 in _BINARY.items():
    OPS[_name] = _binary(_fn2)


@op("Div")
def _div(_node: Node, xs: Inputs) -> list[Tensor]:
    a, b = need(xs[0]), need(xs[1])
    if not a.is_floating_point() and not b.is_floating_point():
        return [torch.div(a, b, rounding_mode="trunc")]  # integer Div truncates, as onnxruntime does
    return [a / b]


@op("Pow")
def _pow(_node: Node, xs: Inputs) -> list[Tensor]:
    a = need(xs[0])
    return [torch.pow(a, need(xs[1])).to(a.dtype)]  # the result has the base's type


@op("Mod")
def _mod(node: Node, xs: Inputs) -> list[Tensor]:
    a, b = need(xs[0]), need(xs[1])
    return [torch.fmod(a, b) if node.attr("fmod", 0) else torch.remainder(a, b)]


_COMBINE: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Sum": torch.add, "Mean": torch.add, "Max": torch.maximum, "Min": torch.minimum,
}


@op(*_COMBINE)
def _variadic(node: Node, xs: Inputs) -> list[Tensor]:
    tensors = [need(x) for x in xs]
    combine = _COMBINE[node.op_type]
    out = tensors[0]
    for t in tensors[1:]:
        out = combine(out, t)
    return [out / len(tensors) if node.op_type == "Mean" else out]


@op("LeakyRelu")
def _leaky_relu(node: Node, xs: Inputs) -> list[Tensor]:
    return [F.leaky_relu(need(xs[0]), float(node.attr("alpha", 0.01)))]


@op("Elu", "Celu")
def _elu(node: Node, xs: Inputs) -> list[Tensor]:
    alpha = float(node.attr("alpha", 1.0))
    return [F.elu(need(xs[0]), alpha) if node.op_type == "Elu" else F.celu(need(xs[0]), alpha)]


@op("Selu")
def _selu(node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])
    alpha = float(node.attr("alpha", 1.67326319217681884765625))
    gamma = float(node.attr("gamma", 1.05070102214813232421875))
    return [gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))]


@op("HardSigmoid")
def _hard_sigmoid(node: Node, xs: Inputs) -> list[Tensor]:
    alpha, beta = float(node.attr("alpha", 0.2)), float(node.attr("beta", 0.5))
    return [torch.clamp(alpha * need(xs[0]) + beta, 0.0, 1.0)]


@op("PRelu")
def _prelu(_node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])
    return [torch.where(x < 0, need(xs[1]) * x, x)]


@op("Gelu")
def _gelu(node: Node, xs: Inputs) -> list[Tensor]:
    return [F.gelu(need(xs[0]), approximate=str(node.attr("approximate", "none")))]


@op("Clip")
def _clip(node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])
    if node.opset < 11:  # bounds were attributes before opset 11
        return [torch.clamp(x, float(node.attr("min", -math.inf)), float(node.attr("max", math.inf)))]
    low, high = optional_input(xs, 1), optional_input(xs, 2)
    if low is not None:
        x = torch.maximum(x, low.to(x.dtype))
    if high is not None:
        x = torch.minimum(x, high.to(x.dtype))
    return [x]


@op("Where")
def _where(_node: Node, xs: Inputs) -> list[Tensor]:
    return [torch.where(need(xs[0]).bool(), need(xs[1]), need(xs[2]))]


@op("Cast")
def _cast(node: Node, xs: Inputs) -> list[Tensor]:
    return [need(xs[0]).to(compute_dtype(TORCH_DTYPES[int(node.attr("to"))]))]


@op("CastLike")
def _cast_like(_node: Node, xs: Inputs) -> list[Tensor]:
    return [need(xs[0]).to(need(xs[1]).dtype)]


@op("Dropout")
def _dropout(node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])  # inference semantics: the bridge trains deterministically
    return [x, torch.ones_like(x, dtype=torch.bool)][:len(node.outputs)]


@op("Einsum")
def _einsum(node: Node, xs: Inputs) -> list[Tensor]:
    return [torch.einsum(str(node.attr("equation")), *[need(x) for x in xs])]


# ---- shapes ------------------------------------------------------------------------------------------------------

@op("Shape")
def _shape(node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])
    dims = list(x.shape)[slice(node.attr("start"), node.attr("end"))]
    return [torch.tensor(dims, dtype=torch.int64, device=x.device)]


@op("Size")
def _size(_node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])
    return [torch.tensor(x.numel(), dtype=torch.int64, device=x.device)]


@op("Reshape")
def _reshape(node: Node, xs: Inputs) -> list[Tensor]:
    x, shape = need(xs[0]), ints(xs[1])
    if not node.attr("allowzero", 0):  # 0 copies the input's dimension unless allowzero
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


@op("Flatten")
def _flatten(node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])
    axis = int(node.attr("axis", 1)) % (x.dim() + 1) if x.dim() else 0
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


@op("Transpose")
def _transpose(node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])
    perm = node.attr("perm") or list(range(x.dim()))[::-1]
    return [x.permute([int(p) for p in perm])]


@op("Squeeze")
def _squeeze(node: Node, xs: Inputs) -> list[Tensor]:
    x, axes = need(xs[0]), axes_from(node, xs, 1)
    if not axes:
        return [x.squeeze()]
    return [x.squeeze(tuple(a % x.dim() for a in axes))]


@op("Unsqueeze")
def _unsqueeze(node: Node, xs: Inputs) -> list[Tensor]:
    x, axes = need(xs[0]), axes_from(node, xs, 1) or []
    rank = x.dim() + len(axes)  # axes index the output
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return [x]


@op("Concat")
def _concat(node: Node, xs: Inputs) -> list[Tensor]:
    return [torch.cat([need(x) for x in xs], dim=int(node.attr("axis")))]


@op("Split")
def _split(node: Node, xs: Inputs) -> list[Tensor]:
    x, axis = need(xs[0]), int(node.attr("axis", 0))
    sizes = ints(optional_input(xs, 1)) or [int(s) for s in node.attr("split", [])]
    if not sizes:  # equal parts; opset 18's num_outputs lets the last one be smaller
        count = int(node.attr("num_outputs", len(node.outputs)))
        dim = x.shape[axis]
        chunk = -(-dim // count)
        sizes = [chunk] * (count - 1) + [dim - chunk * (count - 1)]
    return list(torch.split(x, sizes, dim=axis))


def _slice_range(start: int, end: int, step: int, dim: int) -> range:
    """ONNX clamps differently from Python for negative steps, so the bounds are worked out here."""
    start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
    if step > 0:
        return range(min(max(start, 0), dim), min(max(end, 0), dim), step)
    return range(min(max(start, 0), dim - 1), min(max(end, -1), dim - 1), step)


@op("Slice")
def _slice(node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])
    if node.opset < 10:
        starts, ends = list(node.attr("starts")), list(node.attr("ends"))
        axes, steps = list(node.attr("axes", range(len(starts)))), [1] * len(starts)
    else:
        starts, ends = ints(xs[1]), ints(xs[2])
        axes = ints(optional_input(xs, 3)) or list(range(len(starts)))
        steps = ints(optional_input(xs, 4)) or [1] * len(starts)
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        axis %= x.dim()
        span = _slice_range(int(start), int(end), int(step), x.shape[axis])
        if step > 0:
            x = x[(slice(None),) * axis + (slice(span.start, max(span.stop, span.start), step),)]
        else:
            x = x.index_select(axis, torch.tensor(list(span), dtype=torch.int64, device=x.device))
    return [x]


@op("Gather")
def _gather(node: Node, xs: Inputs) -> list[Tensor]:
    data, index = need(xs[0]), need(xs[1]).long()
    axis = int(node.attr("axis", 0)) % data.dim()
    index = torch.where(index < 0, index + data.shape[axis], index)
    picked = data.index_select(axis, index.reshape(-1))
    # a scalar index on a 1-D tensor (a dimension out of Shape) gives a 0-d result: the shape may be empty
    return [picked.reshape((*data.shape[:axis], *index.shape, *data.shape[axis + 1:]))]


@op("GatherElements")
def _gather_elements(node: Node, xs: Inputs) -> list[Tensor]:
    data, index = need(xs[0]), need(xs[1]).long()
    axis = int(node.attr("axis", 0)) % data.dim()
    return [torch.gather(data, axis, torch.where(index < 0, index + data.shape[axis], index))]


@op("Expand")
def _expand(_node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])  # bidirectional broadcast, unlike torch.expand
    return [x.expand(np.broadcast_shapes(tuple(x.shape), tuple(ints(xs[1]))))]


@op("Tile")
def _tile(_node: Node, xs: Inputs) -> list[Tensor]:
    return [need(xs[0]).repeat(ints(xs[1]))]


@op("Range")
def _range(_node: Node, xs: Inputs) -> list[Tensor]:
    start, limit, delta = need(xs[0]), need(xs[1]), need(xs[2])
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)]


@op("ConstantOfShape")
def _constant_of_shape(node: Node, xs: Inputs) -> list[Tensor]:
    value = node.attr("value")
    array = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    fill = torch.from_numpy(array.astype(np.float32) if array.dtype.kind == "f" else array.copy())
    return [torch.full(ints(xs[0]), fill.item(), dtype=compute_dtype(fill.dtype), device=need(xs[0]).device)]


@op("ArgMax", "ArgMin")
def _arg_extreme(node: Node, xs: Inputs) -> list[Tensor]:
    x, axis = need(xs[0]), int(node.attr("axis", 0))
    keep = bool(node.attr("keepdims", 1))
    pick = torch.argmax if node.op_type == "ArgMax" else torch.argmin
    if node.attr("select_last_index", 0):  # ties resolve to the last index: search the flipped tensor
        return [x.shape[axis] - 1 - pick(x.flip(axis), dim=axis, keepdim=keep)]
    return [pick(x, dim=axis, keepdim=keep)]
