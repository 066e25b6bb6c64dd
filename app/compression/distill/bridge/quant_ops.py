"""QuantizeLinear / DequantizeLinear as fake quantization, for quantization-aware training.

QuantizeLinear rounds x/scale + zero_point to the integer grid and saturates to its type's range, but keeps the
result in float with a straight-through gradient (identity inside the range, zero where it saturates): the
forward pass computes what onnxruntime's QDQ graph computes (round half to even on both sides), the backward pass
lets the weights in front of it learn. Scales and zero points stay fixed at their calibrated values.
"""

from __future__ import annotations

import torch

from app.compression.distill.bridge.coverage import Node
from app.compression.distill.bridge.ops import Inputs, OpFn, Tensor, need, optional_input, register

QUANT_OPS: dict[str, OpFn] = {}
_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-32768, 32767),
           torch.uint16: (0, 65535), torch.int32: (-2**31, 2**31 - 1)}


def _along(value: Tensor, node: Node, rank: int) -> Tensor:
    """A per-axis scale or zero point shaped to broadcast along the node's axis (per-tensor: as it is)."""
    if value.dim() == 0 or value.numel() == 1:
        return value.reshape(())
    axis = int(node.attr("axis", 1))
    axis = axis + rank if axis < 0 else axis
    shape = [1] * rank
    shape[axis] = value.numel()
    return value.reshape(shape)


@register(QUANT_OPS, "QuantizeLinear")
def _quantize(node: Node, xs: Inputs) -> list[Tensor]:
    x, scale, zero = need(xs[0]), need(xs[1]), optional_input(xs, 2)
    low, high = _RANGES.get(zero.dtype if zero is not None else torch.uint8, (0, 255))
    scaled = x.float() / _along(scale.float(), node, x.dim())
    if zero is not None:
        scaled = scaled + _along(zero.float(), node, x.dim())
    rounded = scaled + (torch.round(scaled) - scaled).detach()
    return [torch.clamp(rounded, low, high)]


@register(QUANT_OPS, "DequantizeLinear")
def _dequantize(node: Node, xs: Inputs) -> list[Tensor]:
    q, scale, zero = need(xs[0]), need(xs[1]), optional_input(xs, 2)
    value = q.float()
    if zero is not None:
        value = value - _along(zero.float(), node, q.dim())
    return [value * _along(scale.float(), node, q.dim())]
