"""Producer and consumer indexes over an ONNX graph, and projections (a MatMul by a constant weight) found in it:
what the encoder analysis (`transformer`) and the packed and fused attention analysis (`packed`) share."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

# Ops after an up-projection that add its bias themselves (onnxruntime's fusions of bias + activation).
_BIAS_ACTIVATIONS = {"BiasGelu", "FastGelu"}


@dataclass(frozen=True)
class Projection:
    """A `MatMul` by a constant [in, out] weight, with the bias `Add` after it if there is one."""

    matmul: int
    weight: str
    bias: str | None
    output: str
    """The projection's result: the bias Add's output, else the MatMul's."""
    transposed: bool = False
    """The weight is stored [out, in]: a `Gemm` with transB=1 (torch.nn.MultiheadAttention's output projection)."""


class Graph:
    """Producer and consumer indexes over one graph's nodes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.nodes = list(model.graph.node)
        self.constants = {t.name: t for t in model.graph.initializer}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for index, node in enumerate(self.nodes):
            for name in node.output:
                self.producer[name] = index
            for name in node.input:
                if name:
                    self.consumers[name].append(index)
        for node in self.nodes:  # a Constant node's value counts as a constant too
            if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
                self.constants[node.output[0]] = node.attribute[0].t

    def node(self, name: str) -> onnx.NodeProto | None:
        index = self.producer.get(name)
        return self.nodes[index] if index is not None else None

    def array(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return numpy_helper.to_array(tensor) if tensor is not None else None

    def sole_consumer(self, name: str) -> onnx.NodeProto | None:
        """The one node computing with `name`; `Shape` readers do not count (exporters' dynamic shape
        arithmetic, which the surgery replaces by constants where it matters)."""
        users = [i for i in self.consumers.get(name, []) if self.nodes[i].op_type != "Shape"]
        return self.nodes[users[0]] if len(users) == 1 else None


def projection(view: Graph, name: str, from_matmul: bool = False) -> Projection | None:
    """The projection whose result is `name` (a bias Add's output or the MatMul's), or whose MatMul writes it."""
    node = view.node(name)
    bias = None
    if node is not None and node.op_type == "Add" and not from_matmul:
        constant = [i for i in node.input if i in view.constants]
        moving = [i for i in node.input if i not in view.constants]
        if len(constant) != 1 or len(moving) != 1:
            return None
        bias, node = constant[0], view.node(moving[0])
    if node is None or node.op_type != "MatMul" or node.input[1] not in view.constants \
            or len(view.constants[node.input[1]].dims) != 2:
        return None
    output = name if bias is not None else node.output[0]
    if from_matmul:  # a bias Add right after the MatMul belongs to the projection
        after = view.sole_consumer(output)
        constant = [i for i in after.input if i in view.constants] if after is not None else []
        if after is not None and after.op_type == "Add" and len(constant) == 1 \
                and len(view.constants[constant[0]].dims) == 1:
            bias, output = constant[0], after.output[0]
        elif after is not None and after.op_type in _BIAS_ACTIVATIONS and after.input[0] == output \
                and len(after.input) > 1 and after.input[1] in view.constants:
            bias, output = after.input[1], after.output[0]  # BiasGelu(x, b): sliced with the columns
    if bias is not None and list(view.constants[bias].dims) != [view.constants[node.input[1]].dims[1]]:
        return None
    return Projection(view.producer[node.output[0]], node.input[1], bias, output)


def ancestry(view: Graph, name: str, through_shapes: bool = True) -> set[str]:
    """`name` and every tensor it is computed from (not looking past `Shape` nodes unless `through_shapes`)."""
    seen, frontier = {name}, [name]
    while frontier:
        node = view.node(frontier.pop())
        if node is None or (node.op_type == "Shape" and not through_shapes):
            continue
        for source in node.input:
            if source and source not in seen:
                seen.add(source)
                frontier.append(source)
    return seen


def scalar(view: Graph, name: str) -> bool:
    array = view.array(name)
    return array is not None and array.size == 1
