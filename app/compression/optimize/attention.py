"""Fuses packed-QKV self-attention, as torch's exporter writes it, into one com.microsoft `Attention` node.

onnxruntime's transformer optimizer only matches attention with separate Q, K and V projections. Encoders
exported from `nn.MultiheadAttention`-style modules use one packed projection instead:

    qkv = Add(MatMul(x, W[hidden, 3*hidden]), b)          # Add operands in either order
    Reshape(qkv, [B, S, 3, H, D]) -> Transpose(2,0,3,1,4) -> Slice(i:i+1, axis 0) -> Squeeze(0)  for q, k, v
    scores = Mul(MatMul(q, Transpose(k, 0,1,3,2)), scale)  # or Div(..., sqrt(D))
    scores = Where(Unsqueeze(Equal(mask, 0), [1, 2]), -inf, scores)     # optional key-padding mask
    out = Reshape(Transpose(MatMul(Softmax(scores), v), 0,2,1,3), [B, S, H*D])

`Attention` takes the same packed weights (its layout is Q, K, V blocks of H*D columns) and a raw 0/1 mask,
so the fusion copies no weights. Every structural fact is checked; anything else is left alone, and the
caller compares the fused model's outputs with the input's before keeping it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
# Attention adds this to masked scores; anything at or below it (or -inf) in the original is equivalent.
_MASK_FILTER = -10000.0


@dataclass(frozen=True)
class Fused:
    count: int
    num_heads: int
    hidden_size: int


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.producer = {o: n for n in model.graph.node for o in n.output if o}
        self.initializers = {i.name: i for i in model.graph.initializer}

    def parent(self, node: onnx.NodeProto, index: int, op_type: str) -> onnx.NodeProto | None:
        if len(node.input) <= index:
            return None
        found = self.producer.get(node.input[index])
        return found if found is not None and found.op_type == op_type and found.domain in ("", "ai.onnx") else None

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return numpy_helper.to_array(value) if value is not None else None
        return None

    def ints(self, name: str) -> list[int] | None:
        value = self.constant(name)
        return [int(v) for v in value.reshape(-1)] if value is not None and value.dtype.kind in "iu" else None


def _attr(node: onnx.NodeProto, name: str) -> object:
    found = next((a for a in node.attribute if a.name == name), None)
    return helper.get_attribute_value(found) if found is not None else None


@dataclass(frozen=True)
class _Match:
    output: str
    x: str
    weight: str
    bias: str
    heads: int
    head_size: int
    scale: float
    mask: str | None


def fuse_attention(model: onnx.ModelProto) -> Fused:
    """Fuse every matching attention block in place; returns how many, with the heads and hidden size seen."""
    g = _Graph(model)
    matches = [m for n in model.graph.node if n.op_type == "Reshape" and (m := _match(g, n)) is not None]
    if not matches:
        return Fused(0, 0, 0)
    mask_casts: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    by_output = {m.output: m for m in matches}
    for node in model.graph.node:
        match = by_output.get(node.output[0]) if node.op_type == "Reshape" else None
        if match is None:
            new_nodes.append(node)
            continue
        inputs = [match.x, match.weight, match.bias]
        if match.mask is not None:
            if match.mask not in mask_casts:
                mask_casts[match.mask] = f"{match.mask}_int32_for_attention"
                new_nodes.append(helper.make_node("Cast", [match.mask], [mask_casts[match.mask]],
                                                  name=f"{match.mask}_cast_int32", to=TensorProto.INT32))
            inputs.append(mask_casts[match.mask])
        new_nodes.append(helper.make_node(
            "Attention", inputs, [match.output], name=f"{node.name}_attention", domain=MS_DOMAIN,
            num_heads=match.heads, scale=match.scale, mask_filter_value=_MASK_FILTER))
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    remove_dead_nodes(model)
    return Fused(len(matches), matches[0].heads, matches[0].heads * matches[0].head_size)


def _match(g: _Graph, out_reshape: onnx.NodeProto) -> _Match | None:
    context = g.parent(out_reshape, 0, "Transpose")
    if context is None or _attr(context, "perm") != [0, 2, 1, 3]:
        return None
    weighted = g.parent(context, 0, "MatMul")
    probs = g.parent(weighted, 0, "Softmax") if weighted is not None else None
    if weighted is None or probs is None or _attr(probs, "axis") not in (-1, 3):
        return None
    scores, mask = _unmask(g, probs)
    if scores is None:
        return None
    q_and_k, scale = _unscale(g, scores)
    v = _unpack(g, weighted, 1)
    if q_and_k is None or scale is None or v is None:
        return None
    k_t = g.parent(q_and_k, 1, "Transpose")
    q, k = _unpack(g, q_and_k, 0), _unpack(g, k_t, 0) if k_t is not None else None
    if k_t is None or _attr(k_t, "perm") != [0, 1, 3, 2] or q is None or k is None:
        return None
    if (q[0], k[0], v[0]) != (0, 1, 2) or len({q[1].output[0], k[1].output[0], v[1].output[0]}) != 1:
        return None
    return _projection(g, q[1], out_reshape, scale, mask)


def _unmask(g: _Graph, probs: onnx.NodeProto) -> tuple[onnx.NodeProto | None, str | None]:
    """(the scores node under an optional key-padding Where, the 0/1 mask tensor or None)."""
    where = g.parent(probs, 0, "Where")
    if where is None:
        return g.producer.get(probs.input[0]), None
    fill = g.constant(where.input[1])
    unsqueeze = g.parent(where, 0, "Unsqueeze")
    equal = g.parent(unsqueeze, 0, "Equal") if unsqueeze is not None else None
    if fill is None or fill.size != 1 or float(fill.reshape(-1)[0]) > _MASK_FILTER:
        return None, None
    if unsqueeze is None or equal is None:
        return None, None
    axes = g.ints(unsqueeze.input[1]) if len(unsqueeze.input) > 1 else _attr(unsqueeze, "axes")
    zero = g.constant(equal.input[1])
    if axes != [1, 2] or zero is None or zero.size != 1 or zero.reshape(-1)[0] != 0:
        return None, None
    return g.producer.get(where.input[2]), equal.input[0]


def _unscale(g: _Graph, scores: onnx.NodeProto) -> tuple[onnx.NodeProto | None, float | None]:
    """(the q @ k^T MatMul, the scale applied to it)."""
    if scores.op_type not in ("Mul", "Div") or scores.domain not in ("", "ai.onnx"):
        return None, None
    factor = g.constant(scores.input[1])
    product = g.parent(scores, 0, "MatMul")
    if factor is None or factor.size != 1 or product is None or float(factor.reshape(-1)[0]) == 0.0:
        return None, None
    value = float(factor.reshape(-1)[0])
    return product, value if scores.op_type == "Mul" else 1.0 / value


def _unpack(g: _Graph, node: onnx.NodeProto, index: int) -> tuple[int, onnx.NodeProto] | None:
    """(which of q/k/v, the packed Transpose) for Squeeze(Slice(Transpose(2,0,3,1,4), i:i+1, axis 0), 0)."""
    squeeze = g.parent(node, index, "Squeeze")
    sliced = g.parent(squeeze, 0, "Slice") if squeeze is not None else None
    if squeeze is None or sliced is None or len(sliced.input) < 4:
        return None
    squeeze_axes = g.ints(squeeze.input[1]) if len(squeeze.input) > 1 else _attr(squeeze, "axes")
    starts, ends, axes = (g.ints(sliced.input[i]) for i in (1, 2, 3))
    packed = g.parent(sliced, 0, "Transpose")
    if squeeze_axes != [0] or axes != [0] or starts is None or ends != [starts[0] + 1] or packed is None:
        return None
    if _attr(packed, "perm") != [2, 0, 3, 1, 4] or len(sliced.input) > 4 and g.ints(sliced.input[4]) != [1]:
        return None
    return starts[0], packed


def _projection(g: _Graph, packed: onnx.NodeProto, out_reshape: onnx.NodeProto, scale: float,
                mask: str | None) -> _Match | None:
    split = g.parent(packed, 0, "Reshape")
    add = g.parent(split, 0, "Add") if split is not None else None
    if split is None or add is None:
        return None
    matmul_side = 0 if g.parent(add, 0, "MatMul") is not None else 1
    matmul = g.parent(add, matmul_side, "MatMul")
    if matmul is None:
        return None
    weight, bias = g.initializers.get(matmul.input[1]), g.initializers.get(add.input[1 - matmul_side])
    dims = _shape_tail(g, split.input[1])
    if weight is None or bias is None or dims is None or dims[0] != 3 or len(weight.dims) != 2:
        return None
    heads, head_size = dims[1], dims[2]
    hidden = heads * head_size
    if list(weight.dims)[1] != 3 * hidden or list(bias.dims) != [3 * hidden] or _shape_tail(
            g, out_reshape.input[1], 1) != [hidden]:
        return None
    return _Match(out_reshape.output[0], matmul.input[0], weight.name, bias.name, heads, head_size, scale, mask)


def _shape_tail(g: _Graph, shape: str, count: int = 3) -> list[int] | None:
    """The last `count` entries of a Reshape target, from a constant or a Concat of constants."""
    values = g.ints(shape)
    if values is not None:
        return values[-count:] if len(values) >= count else None
    concat = g.producer.get(shape)
    if concat is None or concat.op_type != "Concat":
        return None
    tail: list[int] = []
    for name in list(concat.input)[-count:]:
        part = g.ints(name)
        if part is None or len(part) != 1:
            return None
        tail.append(part[0])
    return tail if len(tail) == count else None


def detect_heads(model: onnx.ModelProto) -> tuple[int, int] | None:
    """(num_heads, hidden_size) of separate-projection attention, from the split into heads exporters write:
    Transpose(0,2,1,3) of Reshape(Add(MatMul(x, W[hidden, H*D]), b), [.., H or -1, D]). The most common wins.

    onnxruntime's optimizer reads them from a constant Reshape target only, which the TorchScript exporter never
    writes (it builds the shape with Shape/Gather/Concat), so without this it fuses no attention at all.
    """
    g = _Graph(model)
    seen: dict[tuple[int, int], int] = {}
    for node in model.graph.node:
        if node.op_type != "Transpose" or _attr(node, "perm") != [0, 2, 1, 3]:
            continue
        split = g.parent(node, 0, "Reshape")
        add = g.parent(split, 0, "Add") if split is not None else None
        tail = _shape_tail(g, split.input[1], 2) if split is not None else None
        if add is None or tail is None or tail[1] <= 0:
            continue
        matmul = g.parent(add, 0, "MatMul") or g.parent(add, 1, "MatMul")
        weight = g.constant(matmul.input[1]) if matmul is not None else None
        if weight is None or weight.ndim != 2 or weight.shape[1] % tail[1]:
            continue
        heads = weight.shape[1] // tail[1] if tail[0] == -1 else tail[0]  # view(..., -1, head_dim) is common
        if heads * tail[1] == weight.shape[1]:
            seen[(heads, weight.shape[1])] = seen.get((heads, weight.shape[1]), 0) + 1
    return max(seen, key=lambda k: seen[k]) if seen else None


def remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Drop nodes (and initializers) nothing reads any more; returns how many nodes went."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output) or _has_subgraph(node):
            kept.append(node)
            needed.update(node.input)
            needed.update(_subgraph_reads(node))
    removed = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    unused = [i for i in graph.initializer if i.name not in needed]
    for tensor in unused:
        graph.initializer.remove(tensor)
    return removed


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every name read inside a node's subgraphs: some are outer-scope values they capture."""
    reads: set[str] = set()
    graphs = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    graphs += [g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]
    for sub in graphs:
        for inner in sub.node:
            reads.update(inner.input)
            reads.update(_subgraph_reads(inner))
    return reads
