"""Resize and Upsample as torch functions for the training bridge, coordinate for coordinate as ONNX defines them.

Each resized axis is computed separately: the output coordinate is mapped back to the input
(`coordinate_transformation_mode`), then nearest rounds it (`nearest_mode`) and linear interpolates between
the two neighbours. Gathers and weighted sums keep every path differentiable, and the semantics exact
(F.interpolate has no asymmetric linear mode and rounds nearest its own way).
"""

from __future__ import annotations

import math

import torch

from app.compression.distill.bridge.coverage import Node
from app.compression.distill.bridge.ops import Inputs, Tensor, need, op, optional_input


def _sizes_and_scales(node: Node, x: Tensor, xs: Inputs) -> tuple[list[int], list[float]]:
    if node.op_type == "Upsample" or node.opset < 11:
        given = optional_input(xs, 1)
        scales = [float(v) for v in (given.reshape(-1).tolist() if given is not None else node.attr("scales"))]
        return [int(math.floor(d * s)) for d, s in zip(x.shape, scales, strict=True)], scales
    scales_in, sizes_in = optional_input(xs, 2), optional_input(xs, 3)
    axes = [int(a) % x.dim() for a in node.attr("axes", range(x.dim()))]
    sizes, scales = list(x.shape), [1.0] * x.dim()
    if sizes_in is not None and sizes_in.numel():
        for axis, size in zip(axes, sizes_in.reshape(-1).tolist(), strict=True):
            sizes[axis], scales[axis] = int(size), int(size) / x.shape[axis]
    elif scales_in is not None and scales_in.numel():
        for axis, scale in zip(axes, scales_in.reshape(-1).tolist(), strict=True):
            sizes[axis], scales[axis] = int(math.floor(x.shape[axis] * scale)), float(scale)
    return sizes, scales


def _source(node: Node, length: int, size: int, scale: float, device: torch.device) -> Tensor:
    """Input coordinate of every output position along one axis."""
    out = torch.arange(size, dtype=torch.float64, device=device)
    mode = str(node.attr("coordinate_transformation_mode", "half_pixel"))
    if node.op_type == "Upsample" or node.opset < 11:
        mode = "asymmetric"
    if mode == "asymmetric":
        return out / scale
    if mode == "align_corners":
        return out * ((length - 1) / (size - 1)) if size > 1 else torch.zeros_like(out)
    if mode == "tf_half_pixel_for_nn":
        return (out + 0.5) / scale
    if mode == "pytorch_half_pixel" and size <= 1:
        return torch.zeros_like(out)
    return (out + 0.5) / scale - 0.5  # half_pixel and pytorch_half_pixel


def _nearest(node: Node, position: Tensor, length: int) -> Tensor:
    rounding = str(node.attr("nearest_mode", "round_prefer_floor"))
    if node.op_type == "Upsample" or node.opset < 11:
        rounding = "floor"
    if rounding == "round_prefer_floor":
        rounded = torch.ceil(position - 0.5)
    elif rounding == "round_prefer_ceil":
        rounded = torch.floor(position + 0.5)
    else:
        rounded = torch.floor(position) if rounding == "floor" else torch.ceil(position)
    return rounded.long().clamp(0, length - 1)


@op("Resize", "Upsample")
def _resize(node: Node, xs: Inputs) -> list[Tensor]:
    x = need(xs[0])
    sizes, scales = _sizes_and_scales(node, x, xs)
    linear = str(node.attr("mode", "nearest")) == "linear"
    for axis, (length, size, scale) in enumerate(zip(x.shape, sizes, scales, strict=True)):
        if size == length and scale == 1.0:
            continue
        position = _source(node, length, size, scale, x.device)
        if not linear:
            x = x.index_select(axis, _nearest(node, position, length))
            continue
        position = position.clamp(0, length - 1)
        low = torch.floor(position).long()
        high = (low + 1).clamp(max=length - 1)
        weight = (position - low).to(x.dtype).reshape((-1,) + (1,) * (x.dim() - axis - 1))
        x = x.index_select(axis, low) * (1 - weight) + x.index_select(axis, high) * weight
    return [x]
