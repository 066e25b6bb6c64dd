"""Channel dependencies for structured pruning: which output channels may go, and what else must shrink with them.

Every output channel of a prunable layer (Conv, Gemm, MatMul with a constant weight) is an *atom*. One pass over
the topologically sorted graph records, for each tensor that carries atoms, which atom sits at each position of
its channel axis (a Flatten repeats each atom H*W times, a Concat lays atoms side by side). An op that combines
two such tensors position by position (a residual Add) *unites* their atoms: a united class goes or stays as a
whole. Each constant that must shrink with a tensor is an `Edit`: slice input i of node n along an axis, keeping
the positions whose atom survives. An op the analysis cannot prove channel-safe *pins* the atoms it sees, with a
reason; every layer tied to a pinned atom is left untouched and reported, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

Shape = tuple[int | None, ...]

UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Erf", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor",
    "Ceil", "Round", "Sign", "Sin", "Cos", "Identity", "Cast", "Not", "IsNaN", "IsInf", "Clip", "Dropout",
})
# Position-wise ops with numpy broadcasting: every operand is either tied to the channels or broadcast over them.
ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Mod", "Equal", "Greater",
    "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor",
})
CONTRIB_POSITIONWISE = frozenset({"Gelu", "QuickGelu", "FastGelu", "BiasGelu"})
POOLS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})


@dataclass(frozen=True)
class Layout:
    axis: int
    """Negative (from the end), so a broadcast to a higher rank keeps it."""
    atoms: np.ndarray
    rank: int | None = None


@dataclass
class Producer:
    node: int
    label: str
    op: str
    weight: str
    output: str
    layout: Layout
    out_axis: int
    """Axis of the weight that holds the output channels."""


@dataclass(frozen=True)
class Edit:
    node: int
    input: int
    axis: int
    atoms: np.ndarray


@dataclass(frozen=True)
class ShapeEdit:
    """A Reshape that flattens the channels: its last target dimension becomes the kept count."""

    node: int
    atoms: np.ndarray


@dataclass
class Analysis:
    producers: list[Producer] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)
    shape_edits: list[ShapeEdit] = field(default_factory=list)
    carried: dict[str, np.ndarray] = field(default_factory=dict)
    """Tensor -> atoms on its channel axis: the tensors whose shape may change."""
    parent: list[int] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)
    """Atom -> index of its producer, -1 for channels no layer controls."""
    pins: dict[int, str] = field(default_factory=dict)

    def new_atoms(self, count: int, owner: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        self.owner.extend([owner] * count)
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, atom: int) -> int:
        root = atom
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[atom] != root:  # path compression
            self.parent[atom], atom = root, self.parent[atom]
        return root

    def roots(self) -> np.ndarray:
        return np.array([self.find(a) for a in range(len(self.parent))], dtype=np.int64)

    def unite(self, left: np.ndarray, right: np.ndarray) -> None:
        for a, b in zip(left.tolist(), right.tolist(), strict=True):
            ra, rb = self.find(a), self.find(b)
            if ra != rb:
                self.parent[max(ra, rb)] = min(ra, rb)

    def pin(self, atoms: np.ndarray, reason: str) -> None:
        for atom in np.unique(atoms).tolist():
            self.pins.setdefault(int(atom), reason)


def node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from its enclosing scope."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                used |= outer_names(sub)
        defined.update(node.output)
    return used - defined


class AnalyzerCore:
    def __init__(self, model: onnx.ModelProto, shapes: dict[str, Shape]) -> None:
        graph = model.graph
        inputs = {v.name for v in graph.input}
        # An initializer listed as a graph input is only a default the caller may override: not a constant.
        self._tensors = {t.name: t for t in graph.initializer if t.name not in inputs}
        self._arrays: dict[str, np.ndarray] = {}
        self._shapes = shapes
        self._opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
        self._graph = graph
        self.result = Analysis()
        self._layouts: dict[str, Layout] = {}

    # -- helpers ---------------------------------------------------------------------------------------------------

    def const(self, name: str) -> np.ndarray | None:
        if name not in self._tensors:
            return None
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self._tensors[name])
        return self._arrays[name]

    def _float_const(self, name: str, min_rank: int) -> np.ndarray | None:
        value = self.const(name) if name else None
        return value if value is not None and value.dtype.kind == "f" and value.ndim >= min_rank else None

    def _shape(self, name: str) -> Shape | None:
        value = self.const(name)
        return tuple(value.shape) if value is not None else self._shapes.get(name)

    def _rank(self, name: str, layout: Layout) -> int | None:
        shape = self._shape(name)
        return len(shape) if shape is not None else layout.rank

    def _set(self, name: str, layout: Layout) -> None:
        if name:
            self._layouts[name] = layout
            self.result.carried[name] = layout.atoms

    def _pin_all(self, tracked: dict[int, Layout], reason: str) -> None:
        for layout in tracked.values():
            self.result.pin(layout.atoms, reason)

    # -- the pass --------------------------------------------------------------------------------------------------

    def run(self) -> Analysis:
        for index, node in enumerate(self._graph.node):
            label = node_label(node, index)
            tracked = {i: self._layouts[n] for i, n in enumerate(node.input) if n in self._layouts}
            outer = set()
            for attribute in node.attribute:
                for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    outer |= outer_names(sub)
            hidden = [self._layouts[n] for n in outer if n in self._layouts]
            if hidden:
                self._pin_all(dict(enumerate(hidden)), f"{node.op_type} '{label}' reads the channels in a subgraph")
            if node.domain == "com.microsoft" and node.op_type in CONTRIB_POSITIONWISE:
                # onnxruntime's GELU fusions act position by position; a bias input is a per-channel constant
                (self._unary if len(node.input) == 1 else self._elementwise)(index, node, label, tracked)
                continue
            if node.domain not in ("", "ai.onnx"):
                self._pin_all(tracked, f"custom op {node.domain}.{node.op_type} '{label}' consumes the channels")
                continue
            handler = getattr(self, f"_op_{node.op_type}", None)
            if node.op_type in UNARY:
                self._unary(index, node, label, tracked)
            elif node.op_type in ELEMENTWISE:
                self._elementwise(index, node, label, tracked)
            elif node.op_type in POOLS:
                self._pool(node, label, tracked)
            elif handler is not None:
                handler(index, node, label, tracked)
            elif tracked:
                self._pin_all(tracked, f"{node.op_type} '{label}' consumes the channels and is not known to be "
                                       "channel-safe")
        for output in self._graph.output:
            if output.name in self._layouts:
                reason = f"its channels reach the graph output '{output.name}'"
                self.result.pin(self._layouts[output.name].atoms, reason)
        return self.result

    def _producer(self, index: int, node: onnx.NodeProto, label: str, width: int, out_axis: int, layout_axis: int,
                  rank: int | None, bias: tuple[int, int] | None) -> None:
        if width < 2 or not node.output[0]:
            return  # one channel: nothing to remove
        atoms = self.result.new_atoms(width, len(self.result.producers))
        layout = Layout(layout_axis, atoms, rank)
        self.result.producers.append(Producer(index, label, node.op_type, node.input[1], node.output[0], layout,
                                              out_axis))
        self.result.edits.append(Edit(index, 1, out_axis, atoms))
        if bias is not None:
            self.result.edits.append(Edit(index, bias[0], bias[1], atoms))
        self._set(node.output[0], layout)

    def _unary(self, index: int, node: onnx.NodeProto, label: str, tracked: dict[int, Layout]) -> None:
        extra = {i: t for i, t in tracked.items() if i != 0}
        if extra:  # Clip bounds or a Dropout ratio computed from the channels
            self._pin_all(tracked, f"{node.op_type} '{label}' uses the channels as a parameter")
        elif 0 in tracked:
            for output in node.output:
                self._set(output, tracked[0])

    def _elementwise(self, index: int, node: onnx.NodeProto, label: str, tracked: dict[int, Layout]) -> None:
        if not tracked:
            return
        first = next(iter(tracked.values()))
        axis, width = first.axis, len(first.atoms)
        for other in tracked.values():
            if other.axis != axis or len(other.atoms) != width:
                self._pin_all(tracked, f"{node.op_type} '{label}' combines channels on different axes")
                return
        edits = []
        for position, name in enumerate(node.input):
            if not name or position in tracked:
                continue
            shape = self._shape(name)
            size = None if shape is None else (1 if len(shape) < -axis else shape[axis])
            if size == 1 and width != 1:
                continue  # broadcast over the channels
            if size == width and self.const(name) is not None:
                assert shape is not None
                edits.append(Edit(index, position, len(shape) + axis, first.atoms))  # a per-channel constant
                continue
            why = "whose width the pruner cannot change" if size == width else "which may not broadcast"
            self._pin_all(tracked, f"{node.op_type} '{label}' ties the channels to '{name}', {why}")
            return
        for other in tracked.values():
            self.result.unite(first.atoms, other.atoms)
        self.result.edits.extend(edits)
        rank = max((t.rank or 0 for t in tracked.values()), default=0) or None
        self._set(node.output[0], Layout(axis, first.atoms, rank))

    def _channel_first(self, node: onnx.NodeProto, label: str, tracked: dict[int, Layout], rank: int | None) -> bool:
        """Input 0 carries the channels on axis 1 and nothing else is tracked."""
        layout = tracked.get(0)
        if layout is not None and rank is not None and layout.axis == 1 - rank and len(tracked) == 1:
            return True
        if tracked:
            self._pin_all(tracked, f"{node.op_type} '{label}' does not take the channels on axis 1")
        return False

    def _pool(self, node: onnx.NodeProto, label: str, tracked: dict[int, Layout]) -> None:
        if 0 not in tracked:
            self._pin_all(tracked, f"{node.op_type} '{label}' takes the channels as a parameter")
            return
        rank = self._rank(node.input[0], tracked[0])
        if not self._channel_first(node, label, tracked, rank):
            return
        if len(node.output) > 1 and node.output[1]:
            self._pin_all(tracked, f"{node.op_type} '{label}' returns indices into the channels")
            return
        self._set(node.output[0], tracked[0])

    def _norm(self, index: int, node: onnx.NodeProto, label: str, tracked: dict[int, Layout], params: int) -> None:
        if 0 not in tracked:
            self._pin_all(tracked, f"{node.op_type} '{label}' takes the channels as a parameter")
            return
        layout = tracked[0]
        if not self._channel_first(node, label, tracked, self._rank(node.input[0], layout)):
            return
        names = list(node.input[1:1 + params])
        values = [self.const(n) for n in names]
        if len(names) < params or any(v is None or v.shape != (len(layout.atoms),) for v in values):
            self._pin_all(tracked, f"{node.op_type} '{label}' has parameters that are not per-channel constants")
            return
        if any(node.output[1:]):
            self._pin_all(tracked, f"{node.op_type} '{label}' runs in training mode")
            return
        self.result.edits.extend(Edit(index, i, 0, layout.atoms) for i in range(1, 1 + params))
        self._set(node.output[0], layout)

    def _op_BatchNormalization(self, index: int, node: onnx.NodeProto, label: str, tracked: dict[int, Layout]) -> None:
        self._norm(index, node, label, tracked, 4)

    def _op_InstanceNormalization(self, index: int, node: onnx.NodeProto, label: str,
                                  tracked: dict[int, Layout]) -> None:
        self._norm(index, node, label, tracked, 2)

    def _op_Conv(self, index: int, node: onnx.NodeProto, label: str, tracked: dict[int, Layout]) -> None:
        weight = self._float_const(node.input[1], 3)
        group = attr(node, "group", 1)
        bias_name = node.input[2] if len(node.input) > 2 else ""
        bias = self._float_const(bias_name, 1)
        usable = weight is not None and group == 1
        if any(i != 0 for i in tracked):
            self._pin_all(tracked, f"Conv '{label}' computes its weights from the channels")
        elif 0 in tracked:
            layout = tracked[0]
            if usable and weight is not None and layout.axis == 1 - weight.ndim \
                    and len(layout.atoms) == weight.shape[1]:
                self.result.edits.append(Edit(index, 1, 1, layout.atoms))
            else:
                why = "is grouped or depthwise" if group != 1 else "has a weight that is not a constant"
                self._pin_all(tracked, f"Conv '{label}' {why}")
        if usable and weight is not None and (not bias_name or bias is not None):
            self._producer(index, node, label, weight.shape[0], 0, 1 - weight.ndim, weight.ndim,
                           (2, 0) if bias_name else None)

    def _op_Gemm(self, index: int, node: onnx.NodeProto, label: str, tracked: dict[int, Layout]) -> None:
        weight = self._float_const(node.input[1], 2)
        trans_a, trans_b = attr(node, "transA", 0), attr(node, "transB", 0)
        if any(i != 0 for i in tracked):
            self._pin_all(tracked, f"Gemm '{label}' computes its weight or bias from the channels")
        elif 0 in tracked:
            layout = tracked[0]
            if weight is not None and layout.axis == (-2 if trans_a else -1) \
                    and len(layout.atoms) == weight.shape[1 if trans_b else 0]:
                self.result.edits.append(Edit(index, 1, 1 if trans_b else 0, layout.atoms))
            else:
                self._pin_all(tracked, f"Gemm '{label}' multiplies the channels by a weight that is not a constant")
        if weight is None:
            return
        width = weight.shape[0 if trans_b else 1]
        bias_name = node.input[2] if len(node.input) > 2 else ""
        bias = self.const(bias_name) if bias_name else None
        if bias_name and bias is None:
            return  # a computed bias: its columns cannot be sliced here
        edit = None
        if bias is not None and bias.ndim >= 1 and bias.shape[-1] == width:
            edit = (2, bias.ndim - 1)
        elif bias is not None and bias.ndim >= 1 and bias.shape[-1] != 1:
            return
        self._producer(index, node, label, width, 0 if trans_b else 1, -1, 2, edit)

    def _op_MatMul(self, index: int, node: onnx.NodeProto, label: str, tracked: dict[int, Layout]) -> None:
        weight = self._float_const(node.input[1], 2)
        if 1 in tracked:
            self._pin_all(tracked, f"MatMul '{label}' uses the channels as its right operand (an attention product?)")
        elif 0 in tracked:
            layout = tracked[0]
            if weight is not None and layout.axis == -1 and len(layout.atoms) == weight.shape[-2]:
                self.result.edits.append(Edit(index, 1, weight.ndim - 2, layout.atoms))
            else:
                self._pin_all(tracked, f"MatMul '{label}' multiplies the channels by another activation")
        if weight is not None:
            self._producer(index, node, label, weight.shape[-1], weight.ndim - 1, -1, None, None)
