"""Following the packed columns of a QKV projection through layout ops, from run-time shapes.

Each tensor gets a layout: per axis, the factors its index is made of, most significant first. A factor is a
digit of the packed column index (kind 'c', column = Σ digit × stride) or of one of the projection input's token
axes (kind 't<i>'). A Reshape regroups the factors (cutting one where a dimension ends inside it), a Transpose
permutes axes, a Gather, Slice or Split picks one value of the leading factors (Q, K or V's third). Once the head
digit is known (`prune.packed`), everything on the way whose axis holds it is what removing heads must rewrite:
`Edit`s for the surgery. What cannot be followed raises `Refused` with the node and why.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from app.compression.errors import UnsupportedModel
from app.compression.prune.graphview import Graph, ancestry, scalar

Factor = tuple[str, int, int]
"""(kind, stride, size): a digit of the packed column index (kind 'c') or of token axis i of the projection's
input (kind 't<i>')."""
Axis = tuple[Factor, ...]
Layout = tuple[Axis, ...]


@dataclass(frozen=True)
class Edit:
    """One input (or attribute) of one node that carries the head count."""

    node: int
    kind: str
    """'scale': the entries flagged scale by kept/total heads (`values`: the constant; None: computed, so a
    Mul and Div are inserted); 'gather': the input's axis `axis` is per head (`values`: (outer, inner) sizes
    around the heads when the axis merges them with others, -1 for the one that varies); 'heads': the fused op's
    attributes; 'columns': the fused op's packed bias, sliced like its weight."""
    position: int = 1
    flags: tuple[bool, ...] = ()
    values: tuple[int, ...] | None = None
    axis: int = 0
    owner: int = -1
    """A part of a Reshape target's Concat: the Reshape (which gets a Concat of its own first)."""


class Refused(Exception):
    """The heads cannot be followed through this layout: why, naming the node (prune.packed adds the attention)."""


def _covers(factor: Factor, digit: Factor) -> bool:
    return factor[0] == digit[0] and factor[1] <= digit[1] and digit[1] * digit[2] <= factor[1] * factor[2]


def _inside(factor: Factor, digit: Factor) -> bool:
    """`factor` is a strict part of `digit` (the head digit cut further)."""
    return factor != digit and factor[0] == digit[0] and digit[1] <= factor[1] \
        and factor[1] * factor[2] <= digit[1] * digit[2]


def holds(axis: Axis, digit: Factor) -> bool:
    return any(_covers(f, digit) for f in axis)


def _reshape(flat: list[Factor], dims: Sequence[int]) -> Layout | None:
    """The input's factors regrouped into `dims`, cutting a factor where a dimension ends inside it."""
    pending, result = list(flat), []
    for dim in dims:
        axis: list[Factor] = []
        product = 1
        while product < dim:
            if not pending or dim % product:
                return None
            kind, stride, size = pending.pop(0)
            need = dim // product
            if size <= need:
                if need % size:
                    return None
                axis.append((kind, stride, size))
                product *= size
            else:
                if size % need:
                    return None
                axis.append((kind, stride * (size // need), need))
                pending.insert(0, (kind, stride, size // need))
                product = dim
        result.append(tuple(axis))
    return tuple(result) if not pending else None


def _cut(axis: Axis, length: int) -> tuple[Axis, Axis] | None:
    """(high factors, low factors) of an axis such that the low ones span `length` elements."""
    high, low, product = list(axis), list[Factor](), 1
    while product < length:
        if not high or length % product:
            return None
        kind, stride, size = high.pop()
        need = length // product
        if size <= need:
            if need % size:
                return None
            low.insert(0, (kind, stride, size))
            product *= size
        else:
            if size % need:
                return None
            low.insert(0, (kind, stride, need))
            high.append((kind, stride * need, size // need))
            product = length
    return tuple(high), tuple(low)


@dataclass
class _Pending:
    kind: str  # "reshape" | "bounds" | "sizes" | "side"
    node: int
    layout: Layout = ()
    """reshape: the output's; bounds/sizes: each listed axis's kept (low) factors; side: the data input's."""
    values: tuple[int, ...] = ()
    position: int = 0


class Tracker:
    """Layouts through the layout ops, and what each would need rewritten once the head digit is known."""

    def __init__(self, view: Graph, layouts: dict[str, Layout], shape: Callable[[str], tuple[int, ...]]) -> None:
        self.view, self.layouts, self._shape = view, layouts, shape
        self.pending: list[_Pending] = []
        self.selected: list[Factor] = []
        """Factors a Gather, Slice or Split picked one value of (Q, K or V's third)."""

    def _ints(self, node: onnx.NodeProto, position: int, name: str) -> list[int] | None:
        """An input (opset 13 on) or, before, the attribute of that name."""
        if len(node.input) > position and node.input[position]:
            array = self.view.array(node.input[position])
            if array is None:
                raise Refused(f"'{node.name}' reads its {name} from a computed tensor")
            return [int(v) for v in array.reshape(-1)]
        return ints_attribute(node, name)

    def step(self, index: int) -> None:
        node = self.view.nodes[index]
        if node.op_type in ("Mul", "Div"):  # a scale on the way (the head size's root, split between Q and K)
            moving = next((i for i in node.input if i in self.layouts), None)
            if moving is None:
                raise Refused(f"'{node.name}' reads a tensor that was not followed")
            self.elementwise(index, self.layouts[moving])
            return
        data = self.layouts.get(node.input[0])
        if data is None:
            raise Refused(f"'{node.name}' reads a tensor that was not followed")
        handler = getattr(self, f"_{node.op_type.lower()}", None)
        if node.op_type in ("Identity", "Cast", "Dropout"):
            self.layouts[node.output[0]] = data
        elif handler is None:
            raise Refused(f"'{node.name}' ({node.op_type}) is not a layout op the heads can be followed through")
        else:
            handler(node, index, data)

    def elementwise(self, index: int, data: Layout) -> None:
        node = self.view.nodes[index]
        if node.op_type == "Softmax":
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
            if axis not in (-1, len(data) - 1):
                raise Refused(f"Softmax '{node.name}' is not over the keys")
        for position, name in enumerate(node.input):
            if name and name not in self.layouts and not scalar(self.view, name):
                self.pending.append(_Pending("side", index, data, position=position))
        for name in node.output:
            self.layouts[name] = data

    def _reshape(self, node: onnx.NodeProto, index: int, data: Layout) -> None:
        dims = self._shape(node.output[0])
        result = _reshape([f for axis in data for f in axis], dims)
        if result is None:
            raise Refused(f"Reshape '{node.name}' regroups the packed columns across their digits")
        self.layouts[node.output[0]] = result
        self.pending.append(_Pending("reshape", index, result))

    def _transpose(self, node: onnx.NodeProto, index: int, data: Layout) -> None:
        perm = ints_attribute(node, "perm") or list(range(len(data)))[::-1]
        self.layouts[node.output[0]] = tuple(data[p] for p in perm)

    def _squeeze(self, node: onnx.NodeProto, index: int, data: Layout) -> None:
        axes = self._ints(node, 1, "axes")
        dims = self._shape(node.input[0])
        drop = {a % len(data) for a in axes} if axes is not None else {i for i, d in enumerate(dims) if d == 1}
        if any(data[a] for a in drop):
            raise Refused(f"Squeeze '{node.name}' removes an axis that is not of size 1")
        self.layouts[node.output[0]] = tuple(axis for i, axis in enumerate(data) if i not in drop)

    def _unsqueeze(self, node: onnx.NodeProto, index: int, data: Layout) -> None:
        axes = self._ints(node, 1, "axes") or []
        rank = len(data) + len(axes)
        result, rest = [], list(data)
        inserted = {a % rank for a in axes}
        for i in range(rank):
            result.append(() if i in inserted else rest.pop(0))
        self.layouts[node.output[0]] = tuple(result)

    def _gather(self, node: onnx.NodeProto, index: int, data: Layout) -> None:
        indices = self.view.array(node.input[1])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % len(data)
        if indices is None or indices.size != 1:
            raise Refused(f"Gather '{node.name}' does not pick one entry of Q, K and V")
        self.selected += data[axis]
        kept = () if indices.ndim == 0 else ((),)
        self.layouts[node.output[0]] = (*data[:axis], *kept, *data[axis + 1:])

    def _slice(self, node: onnx.NodeProto, index: int, data: Layout) -> None:
        computed = [i for i in (1, 2) if len(node.input) > i and self.view.array(node.input[i]) is None]
        if computed:  # torch's chunk(3): bounds from the packed tensor's own shape, which follow the heads
            if not all(depends(self.view, node.input[i], set(self.layouts)) for i in computed):
                raise Refused(f"Slice '{node.name}' computes its bounds from tensors the heads do not reach")
            self._computed_slice(node, data)
            return
        starts, ends = self._ints(node, 1, "starts"), self._ints(node, 2, "ends")
        axes = self._ints(node, 3, "axes") or list(range(len(starts or [])))
        steps = self._ints(node, 4, "steps") or [1] * len(axes)
        dims = self._shape(node.input[0])
        if starts is None or ends is None or any(s != 1 for s in steps):
            raise Refused(f"Slice '{node.name}' is not a plain cut")
        result, lows, bounds = list(data), [], []
        for start, end, axis in zip(starts, ends, axes, strict=True):
            axis %= len(data)
            size = dims[axis]
            first, last = (max(0, min(size, v + size if v < 0 else v)) for v in (start, end))
            cut = _cut(data[axis], last - first) if last > first else None
            if cut is None or first % max(last - first, 1):
                raise Refused(f"Slice '{node.name}' cuts the packed columns inside a digit")
            high, low = cut
            if any(f[0] != "c" for f in high):
                raise Refused(f"Slice '{node.name}' cuts the tokens")
            self.selected += high
            result[axis] = low
            lows.append(low)
            bounds.append((first, last))
        self.layouts[node.output[0]] = tuple(result)
        self.pending.append(_Pending("bounds", index, tuple(lows), tuple(v for pair in bounds for v in pair)))

    def _computed_slice(self, node: onnx.NodeProto, data: Layout) -> None:
        """Only the lengths are known: each cut must pick one value of whole leading factors (checked on data by
        the encoder step, as every packed rewrite)."""
        axes = self._ints(node, 3, "axes")
        if axes is None or (len(node.input) > 4 and node.input[4] and self._ints(node, 4, "steps") != [1] * len(axes)):
            raise Refused(f"Slice '{node.name}' is not a plain cut")
        result, dims = list(data), self._shape(node.output[0])
        for axis in (a % len(data) for a in axes):
            cut = _cut(data[axis], dims[axis])
            if cut is None or any(f[0] != "c" for f in cut[0]):
                raise Refused(f"Slice '{node.name}' cuts the packed columns inside a digit")
            self.selected += cut[0]
            result[axis] = cut[1]
        self.layouts[node.output[0]] = tuple(result)

    def _split(self, node: onnx.NodeProto, index: int, data: Layout) -> None:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % len(data)
        lengths = [self._shape(name)[axis] for name in node.output]
        if len(set(lengths)) != 1:
            raise Refused(f"Split '{node.name}' cuts unequal parts")
        cut = _cut(data[axis], lengths[0])
        if cut is None or any(f[0] != "c" for f in cut[0]):
            raise Refused(f"Split '{node.name}' cuts the packed columns inside a digit")
        self.selected += cut[0]
        for name in node.output:
            self.layouts[name] = (*data[:axis], cut[1], *data[axis + 1:])
        if len(node.input) > 1 and node.input[1]:
            self.pending.append(_Pending("sizes", index, (cut[1],), tuple(self._ints(node, 1, "split") or ())))
        elif ints_attribute(node, "split"):
            raise Refused(f"Split '{node.name}' has its sizes in an attribute (opset < 13)")

    # ---- edits, once the head digit is known ----------------------------------------------------------------

    def edits(self, head: Factor, region: set[str]) -> list[Edit]:
        if any(_covers(f, head) or _inside(f, head) for f in self.selected):
            raise Refused("a Gather, Slice or Split picks some heads only")
        for layout in self.layouts.values():
            if any(_inside(f, head) for axis in layout for f in axis):
                raise Refused("a Reshape cuts the head axis itself")
        edits: list[Edit] = []
        for item in self.pending:
            if item.kind == "reshape":
                edits += self._target(item, head, region)
            elif item.kind == "bounds":
                edits += self._bounds(item, head)
            elif item.kind == "sizes" and holds(item.layout[0], head):
                edits.append(Edit(item.node, "scale", 1, (True,) * len(item.values), item.values))
            elif item.kind == "side":
                edits += self._side(item, head, region)
        return list(dict.fromkeys(edits))  # Reshapes sharing one target edit it once

    def _target(self, item: _Pending, head: Factor, region: set[str]) -> list[Edit]:
        flags = tuple(holds(axis, head) for axis in item.layout)
        if not any(flags):
            return []
        node = self.view.nodes[item.node]
        target = node.input[1]
        array = self.view.array(target)
        if array is not None:
            return [Edit(item.node, "scale", 1, flags, tuple(int(v) for v in array))]
        concat = self.view.node(target)
        if concat is None or concat.op_type != "Concat":
            return [] if depends(self.view, target, region) else [Edit(item.node, "scale", 1, flags)]
        edits, offset = [], 0
        for position, piece in enumerate(concat.input):
            constant = self.view.array(piece)
            length = constant.size if constant is not None else int(np.prod(self._shape(piece)))
            part = flags[offset:offset + length]
            offset += length
            if not any(part):
                continue
            concat_index = self.view.producer[concat.output[0]]
            # on the Reshape's own copy of the Concat: exporters share one target between layers
            if constant is not None and not any(v > 0 for v, f in zip(constant.reshape(-1), part, strict=True) if f):
                continue  # -1 infers and 0 copies: the heads follow by themselves
            if constant is not None:
                edits.append(Edit(concat_index, "scale", position, part, tuple(int(v) for v in constant.reshape(-1)),
                                  owner=item.node))
            elif not depends(self.view, piece, region):  # read off the unchanged input's shape: scale it
                edits.append(Edit(concat_index, "scale", position, part, owner=item.node))
        if offset != len(flags):
            raise Refused(f"Reshape '{node.name}': its target's parts were not measured")
        return edits

    def _bounds(self, item: _Pending, head: Factor) -> list[Edit]:
        flags = tuple(holds(low, head) for low in item.layout)
        if not any(flags):
            return []
        node = self.view.nodes[item.node]
        edits = []
        for position in (1, 2):
            raw = self._ints(node, position, "starts" if position == 1 else "ends") or []
            values = tuple(item.values[2 * j + position - 1] if flag else raw[j] for j, flag in enumerate(flags))
            edits.append(Edit(item.node, "scale", position, flags, values))
        return edits

    def _side(self, item: _Pending, head: Factor, region: set[str]) -> list[Edit]:
        node = self.view.nodes[item.node]
        name = node.input[item.position]
        if depends(self.view, name, region, through_shapes=False):
            return []  # computed from the followed tensors: it follows the heads by itself
        dims = self._shape(name)
        offset = len(item.layout) - len(dims)
        for axis, size in enumerate(dims):
            data_axis = item.layout[axis + offset] if axis + offset >= 0 else ()
            if size == 1 or not holds(data_axis, head):
                continue
            if data_axis == (head,) and size == head[2]:
                return [Edit(item.node, "gather", item.position, axis=axis)]
            at = data_axis.index(head) if head in data_axis else -1
            outer, inner = (-1 if any(f[0] != "c" for f in part) else math.prod(f[2] for f in part)
                            for part in (data_axis[:at], data_axis[at + 1:]))
            if at < 0 or (outer < 0 and inner < 0):
                raise Refused(f"'{name}', combined with the heads in '{node.name}', varies over an axis that "
                              "merges the heads with more than one other dimension")
            # [batch × heads, ...] (torch's MultiheadAttention with need_weights): split, gather, merge back
            return [Edit(item.node, "gather", item.position, values=(outer, inner), axis=axis)]
        return []


def ints_attribute(node: onnx.NodeProto, name: str) -> list[int] | None:
    found = next((a for a in node.attribute if a.name == name), None)
    return [int(v) for v in helper.get_attribute_value(found)] if found is not None else None


def depends(view: Graph, name: str, region: set[str], through_shapes: bool = True) -> bool:
    """`name` is computed from the followed tensors (their values, or with `through_shapes` their shapes)."""
    return not region.isdisjoint(ancestry(view, name, through_shapes))


def kept_columns(sections: Sequence[tuple[int, int, int]], heads: Sequence[int], total: int) -> np.ndarray:
    """The packed columns of the kept heads, in order, in every section alike."""
    keep = np.isin(np.arange(total), np.asarray(heads))
    parts = [first + np.flatnonzero(keep[(np.arange(width) // stride) % total]) for first, width, stride in sections]
    return np.concatenate(parts).astype(np.int64)


def heads_first(value: np.ndarray, layout: Layout, head: Factor | None, batch: str) -> np.ndarray:
    """A heads' context read as [batch, heads, sequence, head_dim]; `batch` is the token kind of the batch."""
    sizes: list[int] = []
    factors: list[Factor] = []
    for axis, dim in zip(layout, value.shape, strict=True):
        fixed = math.prod(f[2] for f in axis if f[0] == "c")
        if sum(f[0] != "c" for f in axis) > 1 or (not axis and dim != 1):
            raise UnsupportedModel("the heads' context merges token axes, or changed shape")
        for f in axis or (("one", 1, 1),):
            factors.append(f)
            sizes.append(dim // fixed if f[0].startswith("t") else f[2])
    tokens = sorted((i for i, f in enumerate(factors) if f[0].startswith("t")),
                    key=lambda i: (factors[i][0] != batch, factors[i][0]))  # the batch first, the sequence last
    heads = [factors.index(head)] if head is not None else []
    inner = sorted((i for i, f in enumerate(factors) if f[0] == "c" and f != head), key=lambda i: -factors[i][1])
    ones = [i for i, f in enumerate(factors) if f[0] == "one"]
    shaped = value.reshape(sizes).transpose([*tokens[:-1], *heads, *tokens[-1:], *inner, *ones])
    return shaped.reshape(math.prod(sizes[i] for i in tokens[:-1]), head[2] if head is not None else 1,
                          sizes[tokens[-1]] if tokens else 1, -1)
