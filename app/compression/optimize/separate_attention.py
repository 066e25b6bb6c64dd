"""Fuses self-attention with separate Q, K and V projections, as the dynamo exporter and vision transformers write
it, into one com.microsoft `Attention` node with packed weights.

onnxruntime's optimizer recognises the TorchScript exporter's BERT (a [B,1,1,S] mask from the raw 0/1 mask)
but not the dynamo exporter's graph, where transformers builds a [B,1,S,S] additive mask with Where, nor the
unmasked attention of ViT. The pattern matched here, every projection from the same input:

    q = Transpose(Reshape(Add(MatMul(x, Wq), bq), [.., H or -1, D]), 0,2,1,3)     (bias on either side, or none)
    k = Transpose(Reshape(Add(MatMul(x, Wk), bk), ...), 0,2,3,1)                   (or 0,2,1,3 then 0,1,3,2)
    v = Transpose(Reshape(Add(MatMul(x, Wv), bv), ...), 0,2,1,3)
    scores = Mul(MatMul(q, k), s) | Div(MatMul(q, k), 1/s) | MatMul(Mul(q, a), Mul(k, b))
    probs = Softmax(Add(Add(scores, t1), t2)) (additive masks and position biases of [B|1, H|1, S, S]; optional)
    out = Reshape(Transpose(MatMul(probs, v), 0,2,1,3), [B, S, H*D or -1])

`Attention` takes [Wq|Wk|Wv] and [bq|bk|bv] and the additive mask as its `attention_bias`. The caller checks the
fused model's outputs against the input's and keeps it only when it is faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from app.compression.optimize.attention import MS_DOMAIN, Fused, _attr, _Graph, _shape_tail, remove_dead_nodes


@dataclass(frozen=True)
class _Projection:
    x: str
    weight: np.ndarray
    bias: np.ndarray
    head_size: int


@dataclass(frozen=True)
class _Match:
    output: str
    x: str
    weight: np.ndarray
    bias: np.ndarray
    heads: int
    scale: float
    terms: list[str]
    """Tensors added to the scores (masks, position biases): their sum is Attention's attention_bias."""
    name: str


def fuse_separate_attention(model: onnx.ModelProto) -> Fused:
    """Fuse every matching block in place; returns how many, with the heads and hidden size seen."""
    g = _Graph(model)
    matches = [m for n in model.graph.node if n.op_type == "Softmax" and (m := _match(g, n)) is not None]
    if not matches:
        return Fused(0, 0, 0)
    by_output = {m.output: m for m in matches}
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        match = by_output.get(node.output[0]) if node.op_type == "Reshape" else None
        if match is None:
            nodes.append(node)
            continue
        weight, bias = f"{match.name}.qkv_weight", f"{match.name}.qkv_bias"
        model.graph.initializer.extend([numpy_helper.from_array(match.weight, weight),
                                        numpy_helper.from_array(match.bias, bias)])
        attention_bias = match.terms[0] if match.terms else ""
        for index, term in enumerate(match.terms[1:]):
            summed = f"{match.name}.attention_bias_{index}"
            nodes.append(helper.make_node("Add", [attention_bias, term], [summed], name=summed))
            attention_bias = summed
        inputs = [match.x, weight, bias] + (["", "", attention_bias] if attention_bias else [])
        nodes.append(helper.make_node("Attention", inputs, [match.output], name=f"{match.name}_attention",
                                      domain=MS_DOMAIN, num_heads=match.heads, scale=match.scale))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    remove_dead_nodes(model)
    hidden = int(matches[0].weight.shape[1] // 3)
    return Fused(len(matches), matches[0].heads, hidden)


def _match(g: _Graph, softmax: onnx.NodeProto) -> _Match | None:
    if _attr(softmax, "axis") not in (-1, 3):
        return None
    probs = softmax.output[0]
    # transformers' eager attention: softmax(dtype=float32).to(dtype), one or two Casts to float
    while (cast := _only_consumer(g, probs, "Cast")) is not None and _attr(cast, "to") == onnx.TensorProto.FLOAT:
        probs = cast.output[0]
    weighted = _only_consumer(g, probs, "MatMul")
    if weighted is None or weighted.input[0] != probs:
        return None
    context = _only_consumer(g, weighted.output[0], "Transpose")
    out = _only_consumer(g, context.output[0], "Reshape") if context is not None else None
    if context is None or out is None or _attr(context, "perm") != [0, 2, 1, 3]:
        return None
    scores, terms = _unbias(g, softmax)
    product, scale = _unscale(g, scores) if scores is not None else (None, 1.0)
    if product is None:
        return None
    q = _projection(g, product.input[0], query=True)
    k = _key(g, product.input[1])
    v = _projection(g, weighted.input[1], query=True)
    if q is None or k is None or v is None or v[1] != 1.0 or len({q[0].x, k.x, v[0].x}) != 1:
        return None
    scale *= q[1]
    if len({q[0].head_size, k.head_size, v[0].head_size}) != 1 or q[0].weight.shape != k.weight.shape:
        return None
    heads = q[0].weight.shape[1] // q[0].head_size
    target = _shape_tail(g, out.input[1], 1)
    if target is None or target[0] not in (-1, heads * v[0].head_size):
        return None
    weight = np.concatenate([q[0].weight, k.weight, v[0].weight], axis=1).astype(np.float32)
    bias = np.concatenate([q[0].bias, k.bias, v[0].bias]).astype(np.float32)
    return _Match(out.output[0], q[0].x, weight, bias, heads, float(scale), terms, out.name or out.output[0])


def _only_consumer(g: _Graph, name: str, op_type: str) -> onnx.NodeProto | None:
    """The one node of `op_type` reading `name`; Shape nodes beside it are allowed (a view(*x.size()[:-2], -1)
    reads the shape of the tensor it reshapes, and goes with it)."""
    found = [n for n in g.model.graph.node if name in n.input and n.op_type != "Shape"]
    return found[0] if len(found) == 1 and found[0].op_type == op_type else None


def _unbias(g: _Graph, softmax: onnx.NodeProto) -> tuple[onnx.NodeProto | None, list[str]]:
    """(the scaled scores, the additive terms on them: a mask, a relative position bias; maybe none)."""
    node = g.producer.get(softmax.input[0])
    terms: list[str] = []
    while node is not None and node.op_type == "Add":
        sides = [g.producer.get(name) for name in node.input]
        scores_side = next((i for i, n in enumerate(sides) if n is not None and n.op_type in ("Mul", "Div", "MatMul",
                                                                                              "Add")), None)
        if scores_side is None:
            return None, []
        terms.append(node.input[1 - scores_side])
        node = sides[scores_side]
    return node, terms


def _unscale(g: _Graph, scores: onnx.NodeProto) -> tuple[onnx.NodeProto | None, float]:
    """(q @ k MatMul, the scale applied to its product)."""
    if scores.op_type == "MatMul":
        return scores, 1.0
    factor = g.constant(scores.input[1])
    product = g.parent(scores, 0, "MatMul")
    if factor is None or factor.size != 1 or product is None or float(factor.reshape(-1)[0]) == 0.0:
        return None, 1.0
    value = float(factor.reshape(-1)[0])
    return product, value if scores.op_type == "Mul" else 1.0 / value


def _scaled(g: _Graph, name: str) -> tuple[str, float]:
    """A Mul by a constant scalar in front of q or k (the dynamo exporter scales both by sqrt(scale))."""
    node = g.producer.get(name)
    if node is not None and node.op_type == "Mul":
        factor = g.constant(node.input[1])
        if factor is not None and factor.size == 1:
            return node.input[0], float(factor.reshape(-1)[0])
    return name, 1.0


def _projection(g: _Graph, name: str, query: bool) -> tuple[_Projection, float] | None:
    """q or v: Transpose(0,2,1,3) of the split into heads of a projection, with any scalar scale before it."""
    name, scale = _scaled(g, name)
    transpose = g.producer.get(name)
    if transpose is None or transpose.op_type != "Transpose" or _attr(transpose, "perm") != [0, 2, 1, 3]:
        return None
    found = _split(g, transpose.input[0])
    return (found, scale) if found is not None else None


def _key(g: _Graph, name: str) -> _Projection | None:
    name, scale = _scaled(g, name)
    transpose = g.producer.get(name)
    if transpose is None or transpose.op_type != "Transpose":
        return None
    perm = _attr(transpose, "perm")
    if perm == [0, 2, 3, 1]:
        found = _split(g, transpose.input[0])
    elif perm == [0, 1, 3, 2]:
        inner = _projection(g, transpose.input[0], query=False)
        found = inner[0] if inner is not None else None
        scale *= inner[1] if inner is not None else 1.0
    else:
        return None
    if found is None:
        return None
    # a scale on k is folded into its weights and bias, where Attention applies none
    return _Projection(found.x, found.weight * scale, found.bias * scale, found.head_size) if scale != 1.0 else found


def _split(g: _Graph, name: str) -> _Projection | None:
    reshape = g.producer.get(name)
    if reshape is None or reshape.op_type != "Reshape":
        return None
    tail = _shape_tail(g, reshape.input[1], 2)
    source = g.producer.get(reshape.input[0])
    if tail is None or tail[1] <= 0 or source is None:
        return None
    bias: np.ndarray | None = None
    if source.op_type == "Add":
        side = 0 if g.parent(source, 0, "MatMul") is not None else 1
        matmul, bias = g.parent(source, side, "MatMul"), g.constant(source.input[1 - side])
        if bias is None:
            return None
    else:
        matmul = source if source.op_type == "MatMul" else None
    weight = g.constant(matmul.input[1]) if matmul is not None else None
    if matmul is None or weight is None or weight.ndim != 2 or weight.shape[1] % tail[1]:
        return None
    if tail[0] not in (-1, weight.shape[1] // tail[1]):
        return None
    bias = np.zeros(weight.shape[1], np.float32) if bias is None else bias.reshape(-1)
    if bias.shape != (weight.shape[1],):
        return None
    return _Projection(matmul.input[0], weight, bias, tail[1])
