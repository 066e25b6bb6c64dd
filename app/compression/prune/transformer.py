"""Where the encoder blocks, attention heads and FFNs of a transformer are in its ONNX graph.

Found from what every exporter writes for multi-head attention (torch.onnx's TorchScript and dynamo exporters of
Hugging Face BERT, RoBERTa, DistilBERT, ViT...): per head-split projection a `MatMul` by a constant weight, an
optional bias `Add`, a `Reshape` into [batch, sequence, heads, head_dim] and `Transpose`s; Q·Kᵀ, an optional scale
and mask, `Softmax`, ·V, a `Transpose` and `Reshape` back, and the output projection. Blocks are found from the
residual stream: the tensor the attention's residual `Add` reads (block start), that `Add` (with the LayerNorm
after it in post-LN models), then the FFN's residual `Add` (and its LayerNorm): the block's end, which must be
the next block's start. Packed QKV (one projection cut into Q, K and V) and onnxruntime's fused `Attention` and
`MultiHeadAttention` are found by `prune.packed`; its `SkipLayerNormalization` (residual Add + LayerNorm) ends a
post-LN sub-layer like the pair it replaces. Anything else (cross-attention, key/value caches, per-head position
biases) is refused with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from app.compression.errors import UnsupportedModel
from app.compression.prune.graphview import Graph, Projection
from app.compression.prune.graphview import projection as _projection
from app.compression.prune.graphview import scalar as _scalar
from app.compression.prune.packed import Found, Packed, fused_attention, packed_attention

_FUSED_OPS = ("Attention", "MultiHeadAttention")
_DECODER_OPS = ("PackedAttention", "PackedMultiHeadAttention", "GroupQueryAttention", "DecoderAttention",
                "DecoderMaskedMultiHeadAttention", "DecoderMaskedSelfAttention", "SparseAttention")
# Ops a head-split projection's value may pass through between its Reshape and the attention MatMuls.
_THROUGH = {"Transpose", "Cast", "Identity", "Dropout", "Where"}
_SCALE = {"Mul", "Div"}
_POSITION_WISE = {"Relu", "Gelu", "FastGelu", "Erf", "Tanh", "Sigmoid", "Mul", "Add", "Div", "Pow", "Sub", "Cast",
                  "Dropout", "Identity", "Softplus", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu"}


@dataclass(frozen=True)
class Attention:
    query: Projection
    key: Projection
    value: Projection
    out: Projection
    splits: tuple[int, ...]
    """The Reshape nodes splitting Q, K and V into heads."""
    merge: int
    """The Reshape node joining the heads back."""
    context: str
    """softmax(QKᵀ)·V, [batch, heads, sequence, head_dim]: what each head adds, before the output projection."""
    heads: int
    head_dim: int
    inner: tuple[int, ...] = ()
    """Reshapes between softmax·V and the merge that keep [batch, heads, sequence, head_dim] as it is."""
    added: tuple[str, ...] = ()
    """What is added to the scores before the Softmax: masks (and, refused, per-head biases)."""
    packed: Packed | None = None
    """Packed QKV or a fused op: query, key and value are then one projection (or the op), and the head count is
    carried where `packed.edits` say (splits and merge are unused)."""
    branch: str = ""
    """What the residual Add reads when it is not out.output (layout ops after the output projection)."""


@dataclass(frozen=True)
class Ffn:
    up: Projection
    down: Projection


@dataclass(frozen=True)
class Block:
    index: int
    start: str
    """The residual stream entering the block."""
    end: str
    """The residual stream leaving it (the next block's start)."""
    attention: Attention
    ffn: Ffn | None


def find_blocks(model: onnx.ModelProto, split_shapes: dict[str, tuple[int, ...]] | None = None) -> list[Block]:
    """The encoder blocks in graph order; raises UnsupportedModel naming why attention cannot be identified.

    `split_shapes` maps `split_outputs`' tensors to their shapes at run time (a head split is [batch, sequence,
    heads, head_dim]); without it (at upload, where nothing runs) heads and head_dim are 0.
    """
    view = Graph(model)
    anchors = _anchors(view)
    if not anchors:
        raise UnsupportedModel("no attention found: the graph has no Softmax, so it is not a transformer whose "
                               "heads or layers can be removed")
    blocks: list[Block] = []
    post_norm: bool | None = None  # post-LN (BERT) or pre-LN (ViT), decided by the first block
    for position, anchor in enumerate(anchors):
        attention = _attention(view, anchor, split_shapes) if view.nodes[anchor].op_type == "Softmax" \
            else _from_found(fused_attention(view, anchor, split_shapes))
        branch = attention.branch or attention.out.output
        if post_norm is None:
            post_norm = _normalized_after(view, branch)
        start, middle = _residual(view, branch, f"attention {position}", post_norm)
        ffn = _ffn(view, _normalized_input(view, middle), middle)
        if ffn is None:
            end = middle
        else:
            _, end = _residual(view, ffn.down.output, f"FFN {position}", post_norm)
        blocks.append(Block(position, start, end, attention, ffn))
    for before, after in zip(blocks, blocks[1:], strict=False):
        if before.end != after.start:
            raise UnsupportedModel(f"blocks {before.index} and {after.index} are not joined by one residual stream "
                                   f"('{before.end}' leaves one, '{after.start}' enters the next)")
    return blocks


def _anchors(view: Graph) -> list[int]:
    """Where each attention is: its Softmax, or onnxruntime's fused op (its decoder kernels are refused)."""
    refused = sorted({n.op_type for n in view.nodes if n.op_type in _DECODER_OPS})
    if refused:
        raise UnsupportedModel(f"the attention is fused into {', '.join(refused)} (onnxruntime's kernels for "
                               "decoders and packed batches): prune heads, FFN neurons or layers before the "
                               "'optimize' step")
    return [i for i, n in enumerate(view.nodes) if n.op_type == "Softmax"
            or (n.op_type in _FUSED_OPS and n.domain == "com.microsoft")]


def _from_found(found: Found) -> Attention:
    query, key, value = found.qkv
    return Attention(query, key, value, found.out, (), -1, found.context, found.heads, found.head_dim,
                     packed=found.packed, branch=found.branch)


def split_outputs(model: onnx.ModelProto) -> list[str]:
    """The head-split Reshapes' outputs, whose run-time shapes `find_blocks` needs (found without them)."""
    view = Graph(model)
    names: list[str] = []
    for anchor in _anchors(view):
        try:
            attention = _attention(view, anchor, None) if view.nodes[anchor].op_type == "Softmax" \
                else _from_found(fused_attention(view, anchor, None))
        except UnsupportedModel:
            continue
        names += attention.packed.probes if attention.packed is not None else []
        names += [view.nodes[i].output[0] for i in attention.splits]
        names += [name for i in attention.inner for name in (view.nodes[i].input[0], view.nodes[i].output[0])]
        names += attention.added
    return list(dict.fromkeys(names))


def _attention(view: Graph, softmax: int, split_shapes: dict[str, tuple[int, ...]] | None) -> Attention:
    label = view.nodes[softmax].name or f"Softmax #{softmax}"
    scores, added = _walk_up(view, view.nodes[softmax].input[0], {"Add", "Mul", "Div", "Cast", "Where", "Sub"})
    if scores is None or scores.op_type != "MatMul":
        raise UnsupportedModel(f"attention at '{label}': no Q·Kᵀ MatMul before its Softmax")
    probabilities = _walk_down(view, view.nodes[softmax].output[0])
    if probabilities is None:
        raise UnsupportedModel(f"attention at '{label}': its Softmax does not feed one ·V MatMul")
    product, weights_side = probabilities
    value_side = product.input[1 - weights_side]
    try:
        query, query_split = _head_projection(view, scores.input[0], label, "query")
        key, key_split = _head_projection(view, scores.input[1], label, "key")
        value, value_split = _head_projection(view, value_side, label, "value")
    except UnsupportedModel:  # Q, K and V cut out of one packed projection?
        found = packed_attention(view, label, scores, product, weights_side, split_shapes)
        if found is None:
            raise
        return _from_found(found)
    out, merge, inner = _merge(view, product.output[0], label)
    width = {_width(view, p.weight) for p in (query, key, value)}
    if len(width) != 1 or _rows(view, out.weight) not in width:
        raise UnsupportedModel(f"attention at '{label}': Q, K, V and the output projection have different widths")
    if len({view.nodes[p.matmul].input[0] for p in (query, key, value)}) != 1:
        raise UnsupportedModel(f"attention at '{label}': Q, K and V are not projected from one tensor "
                               "(cross-attention is not pruned)")
    heads = head_dim = 0
    if split_shapes is not None:
        shapes = {split_shapes.get(view.nodes[i].output[0]) for i in (query_split, key_split, value_split)}
        shape = shapes.pop() if len(shapes) == 1 else None
        if shape is None or len(shape) != 4 or shape[2] * shape[3] != width.pop():
            raise UnsupportedModel(f"attention at '{label}': the heads are not split as [batch, sequence, heads, "
                                   "head_dim] alike for Q, K and V")
        heads, head_dim = int(shape[2]), int(shape[3])
        for bias in added:  # a mask broadcasts over the heads; a bias per head (relative positions) would not
            bias_shape = split_shapes.get(bias)
            if bias_shape is None or (len(bias_shape) == 4 and bias_shape[1] == heads and heads > 1):
                raise UnsupportedModel(f"attention at '{label}': '{bias}' adds a bias per head to the scores "
                                       "(relative positions): its heads cannot be sliced with the others")
        for index in inner:
            node = view.nodes[index]
            if split_shapes.get(node.input[0]) != split_shapes.get(node.output[0]):
                raise UnsupportedModel(f"attention at '{label}': Reshape '{node.name}' between the heads' "
                                       "product and their merge changes the shape")
    return Attention(query, key, value, out, (query_split, key_split, value_split), merge, product.output[0],
                     heads, head_dim, inner, tuple(added))


def _walk_up(view: Graph, name: str, through: set[str]) -> tuple[onnx.NodeProto | None, list[str]]:
    """The first node above `name` that is not one of `through` (following the input that comes from a MatMul
    chain), and what was added to the path on the way (masks, position biases)."""
    node = view.node(name)
    added: list[str] = []
    for _ in range(8):
        if node is None or node.op_type not in through:
            return node, added
        moving = [i for i in node.input if i and i not in view.constants and view.node(i) is not None]
        if node.op_type == "Where":
            moving = moving[-2:]
        # the score path is the input that comes from a MatMul chain, not the mask's
        path = next((i for i in moving if _reaches_matmul(view, i)), None)
        if node.op_type in ("Add", "Sub"):
            added += [i for i in moving if i != path]
        node = view.node(path) if path is not None else None
    return None, added


def _reaches_matmul(view: Graph, name: str) -> bool:
    node = view.node(name)
    for _ in range(8):
        if node is None:
            return False
        if node.op_type == "MatMul":
            return True
        if node.op_type not in {"Add", "Mul", "Div", "Cast", "Where", "Sub"}:
            return False
        node = next((view.node(i) for i in node.input if i and i not in view.constants and view.node(i)), None)
    return False


def _walk_down(view: Graph, name: str) -> tuple[onnx.NodeProto, int] | None:
    """The ·V MatMul the probabilities reach through casts and dropout, and on which side they enter it."""
    for _ in range(4):
        node = view.sole_consumer(name) or _nan_guard(view, name)
        if node is None:
            return None
        if node.op_type == "MatMul":
            return node, list(node.input).index(name)
        if node.op_type not in _THROUGH:
            return None
        name = node.output[0]
    return None


def _nan_guard(view: Graph, name: str) -> onnx.NodeProto | None:
    """`Where(IsNaN(p), 0, p)`: how torch.onnx writes scaled_dot_product_attention's fully-masked rows."""
    users: list[onnx.NodeProto] = [view.nodes[i] for i in view.consumers.get(name, [])
                                   if view.nodes[i].op_type != "Shape"]
    isnan = next((n for n in users if n.op_type == "IsNaN"), None)
    where: onnx.NodeProto | None = next((n for n in users if n.op_type == "Where"), None)
    if len(users) == 2 and isnan is not None and where is not None and where.input[0] == isnan.output[0] \
            and where.input[2] == name:
        return where
    return None


def _head_projection(view: Graph, name: str, label: str, role: str) -> tuple[Projection, int]:
    node = view.node(name)
    for _ in range(6):
        if node is None:
            break
        if node.op_type in _THROUGH or (node.op_type in _SCALE and _scalar(view, node.input[1])):
            node = view.node(node.input[0])
            continue
        if node.op_type == "Reshape":
            projection = _projection(view, node.input[0])
            if projection is None:
                raise UnsupportedModel(f"attention at '{label}': the {role} is not a MatMul by a constant weight "
                                       "(a weight computed in the graph is not pruned)")
            if view.sole_consumer(projection.output) is None:
                raise UnsupportedModel(f"attention at '{label}': the {role} projection is read elsewhere too")
            return projection, view.producer[node.output[0]]
        break
    raise UnsupportedModel(f"attention at '{label}': the {role} is not a projection reshaped into heads")


def _merge(view: Graph, name: str, label: str) -> tuple[Projection, int, tuple[int, ...]]:
    """(output projection, the Reshape merging the heads, Reshapes before it that keep the 4-D shape)."""
    inner: list[int] = []
    for _ in range(6):
        node = view.sole_consumer(name)
        if node is None:
            break
        if node.op_type == "Reshape":
            consumer = view.sole_consumer(node.output[0])
            if consumer is not None and consumer.op_type == "MatMul" and consumer.input[0] == node.output[0]:
                projection = _projection(view, consumer.output[0], from_matmul=True)
                if projection is not None:
                    return projection, view.producer[node.output[0]], tuple(inner)
                break
            inner.append(view.producer[node.output[0]])  # e.g. torch.onnx's scaled_dot_product_attention
        elif node.op_type not in _THROUGH:
            break
        name = node.output[0]
    raise UnsupportedModel(f"attention at '{label}': the heads are not merged by a Reshape into one output "
                           "projection MatMul")


_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization")
# onnxruntime's fusion of the residual Add and the LayerNorm after it: (input, skip, gamma, beta, bias)
_SKIP_NORMS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")


def _normalized_after(view: Graph, branch: str) -> bool:
    """Post-LN: the residual Add's sum is read by a LayerNorm alone (pre-LN reads it twice: norm and residual)."""
    add = view.sole_consumer(branch)
    if add is not None and add.op_type in _SKIP_NORMS:
        return True
    after = view.sole_consumer(add.output[0]) if add is not None else None
    return after is not None and after.op_type in _NORMS


def _skip_norm(view: Graph, branch: str, what: str) -> tuple[str, str] | None:
    """(the stream, the normalized sum) of a SkipLayerNormalization adding `branch` back, when it is one."""
    node = view.sole_consumer(branch)
    if node is None or node.op_type not in _SKIP_NORMS or branch not in node.input[:2]:
        return None
    if len(node.output) > 3 and node.output[3] and view.consumers.get(node.output[3]):
        raise UnsupportedModel(f"{what}: a pre-LN block fused into SkipLayerNormalization '{node.name}' is not "
                               "pruned")
    return str(node.input[1] if node.input[0] == branch else node.input[0]), str(node.output[0])


def _residual(view: Graph, branch: str, what: str, post_norm: bool) -> tuple[str, str]:
    """(the stream the branch is added to, the stream after the Add, and after its LayerNorm when post-LN).

    Pre-LN models end in a final LayerNorm after the last block: it is not the block's, so it stays."""
    fused = _skip_norm(view, branch, what)
    if fused is not None:
        return fused
    add = view.sole_consumer(branch)
    if add is None or add.op_type != "Add" or len(add.input) != 2:
        raise UnsupportedModel(f"{what}: its output is not added to a residual stream")
    stream = add.input[1] if add.input[0] == branch else add.input[0]
    if not post_norm:
        return stream, add.output[0]
    after = view.sole_consumer(add.output[0])
    if after is None or after.op_type not in _NORMS:
        raise UnsupportedModel(f"{what}: a post-LN block whose residual sum is not normalized")
    return stream, after.output[0]


def _normalized_input(view: Graph, stream: str) -> list[str]:
    """What the next sub-layer may read: the stream itself (post-LN) or a LayerNorm of it (pre-LN)."""
    names = [stream]
    for index in view.consumers.get(stream, []):
        node = view.nodes[index]
        if node.op_type in ("LayerNormalization", "SimplifiedLayerNormalization"):
            names.append(node.output[0])
    return names


def _ffn(view: Graph, inputs: list[str], stream: str) -> Ffn | None:
    """up-projection, element-wise activation, down-projection added back onto `stream`."""
    for name in inputs:
        for index in view.consumers.get(name, []):
            up = _projection(view, view.nodes[index].output[0], from_matmul=True) \
                if view.nodes[index].op_type == "MatMul" else None
            if up is None:
                continue
            down = _down(view, up.output)
            if down is not None and _residual_target(view, down.output) == stream:
                return Ffn(up, down)
    return None


def _down(view: Graph, name: str) -> Projection | None:
    """Follow the activation (position-wise ops only) to the MatMul that projects back down."""
    frontier, derived = [name], {name}
    for _ in range(24):
        if not frontier:
            return None
        current = frontier.pop(0)
        for index in view.consumers.get(current, []):
            node = view.nodes[index]
            if node.op_type == "MatMul" and node.input[1] in view.constants and node.input[0] == current:
                return _projection(view, node.output[0], from_matmul=True)
            if node.op_type not in _POSITION_WISE or node.output[0] in derived:
                continue
            # a gate from another projection (SwiGLU) would need slicing too: not an FFN this prunes
            if any(i not in derived and not _scalar(view, i) for i in node.input if i):
                continue  # not yet (the other input may be derived later) or never (a gate)
            derived.add(node.output[0])
            frontier.append(node.output[0])
    return None


def _residual_target(view: Graph, branch: str) -> str | None:
    fused = _skip_norm(view, branch, "FFN")
    if fused is not None:
        return fused[0]
    add = view.sole_consumer(branch)
    if add is None or add.op_type != "Add":
        return None
    return str(add.input[1] if add.input[0] == branch else add.input[0])


def _width(view: Graph, weight: str) -> int:
    return int(view.constants[weight].dims[1])


def _rows(view: Graph, weight: str) -> int:
    return int(view.constants[weight].dims[0])
