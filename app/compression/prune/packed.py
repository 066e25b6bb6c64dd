"""Attention whose Q, K and V come out of one packed projection, or that onnxruntime fused into one op: where its
heads are, and what removing some of them must rewrite.

Packed QKV (torch.nn.MultiheadAttention, `qkv = Linear(E, 3E)` modules): one MatMul by a constant [E, 3E] weight,
cut into Q, K and V and into heads by layout ops (Reshape, Transpose, Split, Slice, Gather, Squeeze, ...) in
whatever order the exporter wrote them. No pattern is matched: the packed columns are followed (`prune.layout`).
Every tensor from the projection to the attention MatMuls, and from their product to the output projection, gets
a layout computed from its run-time shape: each axis a product of factors, digits of the packed column index or
of the projection input's token axes. The column digit in the batch axes of Q·Kᵀ is the head. Then
every Reshape target, Split size and Slice bound on the way whose axis holds the head digit scales by kept/total
heads (constants are rewritten; shape arithmetic read off the unchanged input is multiplied and divided), a
per-head tensor added to the scores (a mask expanded over the heads) keeps the kept heads' entries, and the weight
keeps the columns whose head digit is kept, in each of Q, K and V alike.

Fused (com.microsoft `Attention`, packed weights and `num_heads`; `MultiHeadAttention` after separate Q, K and V
MatMuls): each Q, K and V section of the columns is sliced alike, `num_heads` and `qkv_hidden_sizes` are set.
What cannot be followed exactly is refused with the node and the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx
from onnx import helper

from app.compression.errors import UnsupportedModel
from app.compression.prune.graphview import Graph, Projection, ancestry, projection
from app.compression.prune.layout import Edit, Factor, Layout, Refused, Tracker

_LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Gather", "Slice", "Split", "Identity", "Cast",
               "Dropout"}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity", "Dropout"}
_MERGE_OPS = {"Reshape", "Transpose", "Identity", "Cast"}


@dataclass(frozen=True)
class Packed:
    """How the heads of a packed or fused attention are laid out, and where the head count is carried."""

    kind: str
    """'packed' (one MatMul projects Q, K and V), or the fused op: 'Attention', 'MultiHeadAttention'."""
    sections: tuple[tuple[int, int, int], ...] = ()
    """(first column, width, head stride) of the packed weight's column blocks: a column's head is
    ((column - first) // stride) % heads."""
    edits: tuple[Edit, ...] = ()
    probes: tuple[str, ...] = ()
    """Tensors whose run-time shapes the layouts need (see transformer.split_outputs)."""
    context: Layout = ()
    """The layout of Attention.context, to read it as [batch, heads, sequence, head_dim]."""
    head: Factor | None = None
    batch: str = "t0"
    """The token kind (axis of the projection's input) that is the batch: [S, B, E] in torch's MHA."""


@dataclass(frozen=True)
class Found:
    """What transformer.find_blocks makes an Attention of."""

    qkv: tuple[Projection, Projection, Projection]
    out: Projection
    branch: str
    """What the residual Add reads: the output projection's result after any layout ops."""
    context: str
    heads: int
    head_dim: int
    packed: Packed


@dataclass
class _Region:
    packed: Projection
    operands: tuple[str, str, str]
    scores: onnx.NodeProto
    product: onnx.NodeProto
    weights_side: int
    up: list[int] = field(default_factory=list)
    chain: list[int] = field(default_factory=list)
    merge: list[int] = field(default_factory=list)


# ---- packed QKV -------------------------------------------------------------------------------------------------

def packed_attention(view: Graph, label: str, scores: onnx.NodeProto, product: onnx.NodeProto, weights_side: int,
                     shapes: dict[str, tuple[int, ...]] | None) -> Found | None:
    """Q, K and V of this Softmax's attention from one packed projection; None when they are not (the caller
    keeps its own reason), UnsupportedModel when they are and the heads cannot be followed."""
    operands = (scores.input[0], scores.input[1], product.input[1 - weights_side])
    up: list[int] = []
    found = [_up(view, name, up) for name in operands]
    source = found[0]
    if source is None or any(f is None or f.matmul != source.matmul for f in found):
        return None
    if weights_side != 0:
        raise UnsupportedModel(f"attention at '{label}': the values multiply the probabilities from the left")
    region = _Region(source, operands, scores, product, weights_side, sorted(set(up)),
                     _chain(view, product.input[weights_side], scores.output[0], label))
    out, branch = _merge(view, product.output[0], region.merge, label)
    probes = _probes(view, region)
    if shapes is None:
        return Found((source, source, source), out, branch, product.output[0], 0, 0, Packed("packed", probes=probes))
    return _follow(view, label, region, out, branch, shapes, probes)


def _up(view: Graph, name: str, path: list[int]) -> Projection | None:
    """The projection an attention operand is cut from, through layout ops and scalings (nodes into `path`)."""
    for _ in range(24):
        found = projection(view, name)
        if found is not None:
            return found
        node = view.node(name)
        if node is None:
            return None
        if node.op_type in _LAYOUT_OPS:
            name = node.input[0]
        elif node.op_type in ("Mul", "Div"):
            moving = [i for i in node.input if not _static(view, i)]
            if len(moving) != 1:
                return None
            name = moving[0]
        else:
            return None
        path.append(view.producer[node.output[0]])
    return None


def _static(view: Graph, name: str) -> bool:
    """A constant, or computed from constants and shapes only (a scale from the head size)."""
    return all(n in view.constants or view.node(n) is not None for n in ancestry(view, name, through_shapes=False))


def _chain(view: Graph, end: str, start: str, label: str) -> list[int]:
    """The element-wise nodes from the scores (`start`) to the probabilities the ·V MatMul reads (`end`)."""
    nodes: list[int] = []
    name = end
    for _ in range(12):
        if name == start:
            return nodes[::-1]
        node = view.node(name)
        if node is None or (node.op_type not in _ELEMENTWISE and node.op_type != "Softmax"):
            break
        nodes.append(view.producer[name])
        data = node.input[1:] if node.op_type == "Where" else node.input  # not the condition (a NaN guard's)
        moving = [i for i in data if i and start in ancestry(view, i, through_shapes=False)]
        if len(moving) != 1:
            break
        name = moving[0]
    raise UnsupportedModel(f"attention at '{label}': the scores reach the ·V MatMul through more than "
                           "element-wise ops")


def _merge(view: Graph, name: str, path: list[int], label: str) -> tuple[Projection, str]:
    """(the output projection the heads' product reaches through layout ops, what the residual Add reads)."""
    for _ in range(8):
        node = view.sole_consumer(name)
        if node is None:
            break
        out = _out_projection(view, node, name)
        if out is not None:
            branch = out.output
            for _ in range(4):  # [S, B, E] back to [B, S, E] (torch.nn.MultiheadAttention)
                after = view.sole_consumer(branch)
                if after is None or after.op_type not in ("Reshape", "Transpose") or after.input[0] != branch:
                    break
                branch = after.output[0]
            return out, branch
        if node.op_type not in _MERGE_OPS:
            break
        path.append(view.producer[node.output[0]])
        name = node.output[0]
    raise UnsupportedModel(f"attention at '{label}': the heads' product does not reach one output projection "
                           "through Reshape and Transpose")


def _out_projection(view: Graph, node: onnx.NodeProto, name: str) -> Projection | None:
    """A MatMul (with its bias Add) or a Gemm by a constant weight reading `name` as its left operand."""
    if node.input[0] != name or len(node.input) < 2 or node.input[1] not in view.constants \
            or len(view.constants[node.input[1]].dims) != 2:
        return None
    if node.op_type == "MatMul":
        return projection(view, node.output[0], from_matmul=True)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type != "Gemm" or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
        return None
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return Projection(view.producer[node.output[0]], node.input[1], bias, node.output[0],
                      transposed=bool(attrs.get("transB", 0)))


def _probes(view: Graph, region: _Region) -> tuple[str, ...]:
    names = [region.packed.output, *region.operands, region.scores.output[0], region.product.output[0],
             *_inputs(view)[:1]]  # the batch size: which token axis of the projection is the batch
    for index in sorted({*region.up, *region.chain, *region.merge}):
        node = view.nodes[index]
        names += [n for n in (*node.output, *node.input) if n and n not in view.constants]
        if node.op_type == "Reshape":
            target = view.node(node.input[1])
            if target is not None and target.op_type == "Concat":
                names += [n for n in target.input if n and n not in view.constants]
    return tuple(dict.fromkeys(names))


def _inputs(view: Graph) -> list[str]:
    return [v.name for v in view.model.graph.input if v.name not in view.constants]


# ---- following the columns --------------------------------------------------------------------------------------

def _follow(view: Graph, label: str, region: _Region, out: Projection, branch: str,
            shapes: dict[str, tuple[int, ...]], probes: tuple[str, ...]) -> Found:
    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise UnsupportedModel(f"attention at '{label}': the shape of '{name}' was not measured")
        return tuple(int(d) for d in shapes[name])

    start = shape(region.packed.output)
    layouts: dict[str, Layout] = {region.packed.output: (
        *(((f"t{i}", 1, n),) if n > 1 else () for i, n in enumerate(start[:-1])), (("c", 1, start[-1]),))}
    tracker = Tracker(view, layouts, shape)
    try:
        for index in sorted(region.up):
            tracker.step(index)
        q, k, v = (layouts[name] for name in region.operands)
        scores = _pair(q, k, "Q·Kᵀ")
        layouts[region.scores.output[0]] = scores
        for index in region.chain:
            tracker.elementwise(index, scores)
        if shape(region.product.input[region.weights_side]) != shape(region.scores.output[0]):
            raise Refused("the probabilities do not keep the scores' shape")
        context = _pair(layouts[region.product.input[region.weights_side]], v, "·V")
        layouts[region.product.output[0]] = context
        for index in region.merge:
            tracker.step(index)
        head = _head_digit(q, k, v)
        merged = layouts[view.nodes[out.matmul].input[0]]
        if head is not None and (merged[-1] != (head, *context[-1]) or any(
                f[0] == "c" for axis in merged[:-1] for f in axis)):
            raise Refused("the heads are not merged as [..., heads × head_dim] before the output projection")
        _read_inside(view, region, out, set(layouts))
        edits = tracker.edits(head, set(layouts)) if head is not None else []
    except Refused as refused:
        raise UnsupportedModel(f"attention at '{label}': {refused} (packed QKV from "
                               f"'{view.nodes[region.packed.matmul].name or region.packed.weight}')") from None
    heads = head[2] if head is not None else 1
    head_dim = math.prod(f[2] for f in context[-1])
    rows = view.constants[out.weight].dims[1 if out.transposed else 0]
    if rows != heads * head_dim:
        raise UnsupportedModel(f"attention at '{label}': the output projection reads {rows} inputs, not "
                               f"{heads} heads × {head_dim}")
    batch = shape(_inputs(view)[0])[0] if _inputs(view) else 0
    tokens = [i for i, n in enumerate(start[:-1]) if n == batch]
    sections = ((0, start[-1], head[1]),) if head is not None else ()
    packed = Packed("packed", sections, tuple(edits), probes, context, head, f"t{tokens[0] if len(tokens) == 1 else 0}")
    source = region.packed
    return Found((source, source, source), out, branch, region.product.output[0], heads, head_dim, packed)


def _pair(left: Layout, right: Layout, what: str) -> Layout:
    if len(left) != len(right) or len(left) < 3 or left[:-2] != right[:-2] or left[-1] != right[-2]:
        raise Refused(f"the {what} MatMul does not pair its operands head by head")
    return (*left[:-2], left[-2], right[-1])


def _head_digit(q: Layout, k: Layout, v: Layout) -> Factor | None:
    """The column digit in the batch axes of Q·Kᵀ and ·V: the head (None: one head)."""
    digits = [f for axis in q[:-2] for f in axis if f[0] == "c"]
    if len(digits) > 1:
        raise Refused("more than one column digit runs across the attention's batch axes")
    for operand, inner in ((q, q[-1]), (k, k[-2]), (v, v[-1])):
        columns = {f for axis in operand for f in axis if f[0] == "c"}
        if columns != {*digits, *inner} or any(f[0] != "c" for f in inner):
            raise Refused("Q, K or V is not one third of the packed columns split into heads")
    return digits[0] if digits else None


def _read_inside(view: Graph, region: _Region, out: Projection, followed: set[str]) -> None:
    """Every followed tensor changes shape with the heads: nothing else may compute with it (shapes aside)."""
    inside = {*region.up, *region.chain, *region.merge, out.matmul, view.producer[region.scores.output[0]],
              view.producer[region.product.output[0]]}
    outputs = {v.name for v in view.model.graph.output}
    for name in followed:
        if name in outputs:
            raise Refused(f"'{name}' is an output of the model")
        for index in view.consumers.get(name, []):
            if index not in inside and view.nodes[index].op_type != "IsNaN" and not _shape_only(view, index):
                raise Refused(f"'{name}' is also read by '{view.nodes[index].name or view.nodes[index].op_type}'")


def _shape_only(view: Graph, index: int) -> bool:
    """A Shape, or layout ops whose results only Shape nodes read (torch's MHA measures its key length so)."""
    frontier, seen = [index], {index}
    while frontier:
        node = view.nodes[frontier.pop()]
        if node.op_type == "Shape":
            continue
        if node.op_type not in _MERGE_OPS | {"Squeeze", "Unsqueeze"}:
            return False
        for reader in (i for name in node.output for i in view.consumers.get(name, [])):
            if reader not in seen:
                seen.add(reader)
                frontier.append(reader)
    return True


# ---- fused ops --------------------------------------------------------------------------------------------------

def fused_attention(view: Graph, index: int, shapes: dict[str, tuple[int, ...]] | None) -> Found:
    """com.microsoft `Attention` (packed weight) or `MultiHeadAttention` (after separate Q/K/V MatMuls)."""
    node = view.nodes[index]
    label = node.name or f"{node.op_type} #{index}"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    heads = int(attrs.get("num_heads", 0))
    if heads < 1:
        raise UnsupportedModel(f"{node.op_type} '{label}' has no num_heads")
    if len(node.output) > 1 and any(node.output[1:]) and any(view.consumers.get(o) for o in node.output[1:] if o):
        raise UnsupportedModel(f"{node.op_type} '{label}' returns a key/value cache: decoders are not pruned")
    consumer = view.sole_consumer(node.output[0])
    out = _out_projection(view, consumer, node.output[0]) if consumer is not None else None
    if out is None:
        raise UnsupportedModel(f"{node.op_type} '{label}' does not feed one output projection MatMul")
    if node.op_type == "Attention":
        qkv, sections, extra = _attention_op(view, node, index, label, heads, attrs)
    else:
        qkv, sections, extra = _multi_head_op(view, node, index, label, heads)
    bias_input = 5  # attention_bias [B|1, H|1, S, T], of both ops
    widths = [s[1] for s in sections]
    value_width = widths[-1]
    rows = view.constants[out.weight].dims[1 if out.transposed else 0]
    if rows != value_width:
        raise UnsupportedModel(f"{node.op_type} '{label}': the output projection reads {rows} inputs, not the "
                               f"{value_width} of the values")
    head_dim = value_width // heads
    edits = [Edit(index, "heads"), *extra]
    probes: tuple[str, ...] = ()
    if len(node.input) > bias_input and node.input[bias_input]:
        name = node.input[bias_input]
        probes = (name,)
        if shapes is not None and name not in shapes:
            raise UnsupportedModel(f"{node.op_type} '{label}': the shape of its attention bias was not measured")
        if shapes is not None and len(shapes[name]) == 4 and shapes[name][1] == heads > 1:  # a bias per head
            edits.append(Edit(index, "gather", bias_input, axis=1))
    head: Factor = ("c", head_dim, heads)
    context: Layout = ((("t0", 1, 0),), (("t1", 1, 0),), (head, ("c", 1, head_dim)))
    packed = Packed(node.op_type, tuple(sections), tuple(edits), probes, context, head)
    return Found(qkv, out, out.output, node.output[0], heads, head_dim, packed)


def _attention_op(view: Graph, node: onnx.NodeProto, index: int, label: str, heads: int,
                  attrs: dict[str, object]) -> tuple[tuple[Projection, Projection, Projection],
                                                     list[tuple[int, int, int]], list[Edit]]:
    inputs = list(node.input) + [""] * 7
    weight, bias = inputs[1], inputs[2] or None
    if weight not in view.constants or len(view.constants[weight].dims) != 2 or (
            bias is not None and bias not in view.constants):
        raise UnsupportedModel(f"Attention '{label}': its weights are not constants")
    if inputs[4] or inputs[6] or attrs.get("past_present_share_buffer"):
        raise UnsupportedModel(f"Attention '{label}' reads a key/value cache: decoders are not pruned")
    width = int(view.constants[weight].dims[1])
    given = attrs.get("qkv_hidden_sizes")
    sizes = [int(s) for s in given] if isinstance(given, list) and given else [width // 3] * 3
    if len(sizes) != 3 or sum(sizes) != width or any(s % heads for s in sizes):
        raise UnsupportedModel(f"Attention '{label}': its {width} packed columns are not Q, K and V of {heads} heads")
    sections = [(sum(sizes[:i]), s, s // heads) for i, s in enumerate(sizes)]
    packed = Projection(index, weight, bias, node.output[0])
    return (packed, packed, packed), sections, []


def _multi_head_op(view: Graph, node: onnx.NodeProto, index: int, label: str,
                   heads: int) -> tuple[tuple[Projection, Projection, Projection], list[tuple[int, int, int]],
                                        list[Edit]]:
    inputs = list(node.input) + [""] * 10
    query, key, value = (projection(view, inputs[i]) if inputs[i] else None for i in range(3))
    if query is None or key is None or value is None or len({query.matmul, key.matmul, value.matmul}) != 3 \
            or len({view.nodes[p.matmul].input[0] for p in (query, key, value)}) != 1:
        raise UnsupportedModel(f"MultiHeadAttention '{label}': Q, K and V are not separate projections of one "
                               "tensor (packed or cross-attention is not pruned)")
    if inputs[6] or inputs[7] or inputs[8]:
        raise UnsupportedModel(f"MultiHeadAttention '{label}' reads a key/value cache: decoders are not pruned")
    qkv = (query, key, value)
    widths = [int(view.constants[p.weight].dims[1]) for p in qkv]
    for p in qkv:
        if view.sole_consumer(p.output) is None:
            raise UnsupportedModel(f"MultiHeadAttention '{label}': a projection is read elsewhere too")
    if any(w % heads for w in widths):
        raise UnsupportedModel(f"MultiHeadAttention '{label}': {widths} columns are not {heads} heads each")
    sections = [(sum(widths[:i]), w, w // heads) for i, w in enumerate(widths)]
    edits = []
    if inputs[3]:  # the bias of Q, K and V, packed: sliced like the columns
        if inputs[3] not in view.constants:
            raise UnsupportedModel(f"MultiHeadAttention '{label}': its bias is not a constant")
        edits.append(Edit(index, "columns", 3))
    return qkv, sections, edits
