"""ONNX operators as torch functions for the training bridge: gathers, scatters, running sums, top-k, masks
and the depth/space rearrangements exporters write for attention, position ids and pixel shuffles."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from app.compression.distill.bridge.coverage import Node
from app.compression.distill.bridge.ops import Inputs, Tensor, ints, need, op, optional_input

_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _positive(index: Tensor, sizes: Tensor | int) -> Tensor:
    return torch.where(index < 0, index + sizes, index)


@op("CumSum")
def _cumsum(node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])
    axis = ints(xs[1])[0] % x.dim()
    y = x.flip(axis) if node.attr("reverse", 0) else x
    total = torch.cumsum(y, axis).to(x.dtype)
    if node.attr("exclusive", 0):
        total = total - y
    return [total.flip(axis) if node.attr("reverse", 0) else total]


@op("GatherND")
def _gather_nd(node: Node, xs: Inputs) -> list[Tensor]:
    data, index = need(xs[0]), need(xs[1]).long()
    batch = int(node.attr("batch_dims", 0))
    depth = index.shape[-1]
    sizes = torch.tensor(data.shape[batch:batch + depth], dtype=torch.int64, device=index.device)
    index = _positive(index, sizes)
    rows = math.prod(data.shape[:batch])
    flat_data = data.reshape(rows, *data.shape[batch:])
    flat_index = index.reshape(rows, -1, depth)
    row = torch.arange(rows, device=index.device).view(rows, 1).expand(rows, flat_index.shape[1])
    picked = flat_data[(row, *(flat_index[..., i] for i in range(depth)))]
    return [picked.reshape((*index.shape[:-1], *data.shape[batch + depth:]))]


@op("ScatterND")
def _scatter_nd(node: Node, xs: Inputs) -> list[Tensor]:
    data, index, updates = need(xs[0]), need(xs[1]).long(), need(xs[2])
    depth = index.shape[-1]
    flat = index.reshape(-1, depth)
    values = updates.reshape(flat.shape[0], *data.shape[depth:]).to(data.dtype)
    where = tuple(_positive(flat[:, i], data.shape[i]) for i in range(depth))
    reduction = str(node.attr("reduction", "none"))
    if reduction == "none":
        return [data.index_put(where, values)]
    if reduction == "add":
        return [data.index_put(where, values, accumulate=True)]
    result = data.clone()
    for position in range(flat.shape[0]):  # mul/max/min: rare, so a plain loop
        key = tuple(w[position] for w in where)
        current = result[key]
        combined = {"mul": torch.mul, "max": torch.maximum, "min": torch.minimum}[reduction](current, values[position])
        result = result.index_put(tuple(k.view(1) for k in key), combined.unsqueeze(0))
    return [result]


@op("ScatterElements")
def _scatter_elements(node: Node, xs: Inputs) -> list[Tensor]:
    data, index, updates = need(xs[0]), need(xs[1]).long(), need(xs[2]).to(need(xs[0]).dtype)
    axis = int(node.attr("axis", 0)) % data.dim()
    index = _positive(index, data.shape[axis])
    reduction = str(node.attr("reduction", "none"))
    if reduction == "none":
        return [data.scatter(axis, index, updates)]
    return [data.scatter_reduce(axis, index, updates, reduce=_SCATTER_REDUCE[reduction], include_self=True)]


@op("TopK")
def _topk(node: Node, xs: Inputs) -> list[Tensor]:
    x, k = need(xs[0]), ints(xs[1])[0]
    axis = int(node.attr("axis", -1)) % x.dim()
    values, indices = torch.topk(x, k, dim=axis, largest=bool(node.attr("largest", 1)), sorted=True)
    return [values, indices]


@op("Trilu")
def _trilu(node: Node, xs: Inputs) -> list[Tensor]:
    x, k = need(xs[0]), optional_input(xs, 1)
    offset = ints(k)[0] if k is not None else 0
    return [torch.triu(x, offset) if node.attr("upper", 1) else torch.tril(x, offset)]


@op("OneHot")
def _one_hot(node: Node, xs: Inputs) -> list[Tensor]:
    index, depth, values = need(xs[0]).long(), int(need(xs[1]).reshape(-1)[0].item()), need(xs[2])
    index = _positive(index, depth)
    valid = (index >= 0) & (index < depth)
    hot = F.one_hot(index.clamp(0, depth - 1), depth) * valid.unsqueeze(-1)
    off, on = values.reshape(-1)[0], values.reshape(-1)[1]
    result = (hot.to(values.dtype) * (on - off) + off).to(values.dtype)
    axis = int(node.attr("axis", -1)) % result.dim()
    return [result.movedim(-1, axis)]


@op("IsInf")
def _is_inf(node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])
    found = torch.zeros_like(x, dtype=torch.bool)
    if node.attr("detect_positive", 1):
        found = found | torch.isposinf(x)
    if node.attr("detect_negative", 1):
        found = found | torch.isneginf(x)
    return [found]


@op("DepthToSpace")
def _depth_to_space(node: Node, xs: Inputs) -> list[Tensor]:
    x, size = need(xs[0]), int(node.attr("blocksize"))
    n, c, h, w = x.shape
    if str(node.attr("mode", "DCR")) == "DCR":
        y = x.reshape(n, size, size, c // size**2, h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // size**2, size, size, h, w).permute(0, 1, 4, 2, 5, 3)
    return [y.reshape(n, c // size**2, h * size, w * size)]


@op("SpaceToDepth")
def _space_to_depth(node: Node, xs: Inputs) -> list[Tensor]:
    x, size = need(xs[0]), int(node.attr("blocksize"))
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // size, size, w // size, size).permute(0, 3, 5, 1, 2, 4)
    return [y.reshape(n, c * size**2, h // size, w // size)]
