"""Transformer surgery on the ONNX graph: attention heads and FFN neurons sliced out, whole blocks dropped.

Every edit keeps the graph's interface. Heads: the kept heads' columns of Q, K and V (weights and biases) and
rows of the output projection; the head-split Reshapes get [0, 0, kept heads, head_dim] and the merge
[0, 0, kept heads × head_dim], so the exporter's own shape arithmetic (constants, or Concat of Shape/Gather) no
longer matters. FFN neurons: columns of the up-projection, rows of the down-projection. Blocks: readers of a
block's end read its start instead (the residual stream goes on), then unreachable nodes and weights go.
A weight another node also reads is copied before it is sliced.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from app.compression.prune.apply import refresh_shapes
from app.compression.prune.transformer import Attention, Block, Ffn, Projection


class Surgery:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.tensors = {t.name: t for t in model.graph.initializer}
        self.uses = Counter(name for node in model.graph.node for name in node.input if name)
        self.outputs = {v.name for v in model.graph.output}

    # ---- heads and neurons ---------------------------------------------------------------------------------------

    def keep_heads(self, attention: Attention, heads: Sequence[int]) -> None:
        if len(heads) == attention.heads:
            return
        columns = np.concatenate([np.arange(h * attention.head_dim, (h + 1) * attention.head_dim) for h in heads])
        for projection in (attention.query, attention.key, attention.value):
            self._slice_outputs(projection, columns)
        self._slice_inputs(attention.out, columns)
        nodes = self.model.graph.node
        for split in attention.splits:
            self._reshape(nodes[split], [0, 0, len(heads), attention.head_dim])
        self._reshape(nodes[attention.merge], [0, 0, len(heads) * attention.head_dim])
        for inner in attention.inner:  # found to keep the shape: copying every dimension is what it did
            self._reshape(nodes[inner], [0, 0, 0, 0])

    def _reshape(self, node: onnx.NodeProto, target: list[int]) -> None:
        """A 0 copies the input's dimension (batch, sequence), which needs allowzero off (dynamo sets it)."""
        self._set_input(node, 1, np.array(target, dtype=np.int64))
        kept = [a for a in node.attribute if a.name != "allowzero"]
        del node.attribute[:]
        node.attribute.extend(kept)

    def keep_neurons(self, ffn: Ffn, neurons: np.ndarray) -> None:
        self._slice_outputs(ffn.up, neurons)
        self._slice_inputs(ffn.down, neurons)

    def set_weight(self, matmul: int, array: np.ndarray) -> None:
        """New values for a MatMul's constant weight (a least-squares repair)."""
        self._replace(self.model.graph.node[matmul], 1, array)

    def _slice_outputs(self, projection: Projection, columns: np.ndarray) -> None:
        node = self.model.graph.node[projection.matmul]
        self._replace(node, 1, np.take(self._array(node.input[1]), columns, axis=1))
        if projection.bias is not None:
            add = next(n for n in self.model.graph.node if projection.bias in n.input and
                       (n.output[0] == projection.output))
            position = list(add.input).index(projection.bias)
            self._replace(add, position, np.take(self._array(projection.bias), columns, axis=0))

    def _slice_inputs(self, projection: Projection, rows: np.ndarray) -> None:
        node = self.model.graph.node[projection.matmul]
        self._replace(node, 1, np.take(self._array(node.input[1]), rows, axis=0))

    # ---- blocks --------------------------------------------------------------------------------------------------

    def drop_blocks(self, blocks: Sequence[Block], dropped: Sequence[int]) -> None:
        """Latest first, so a run of dropped blocks chains down to the first kept stream."""
        for block in sorted((blocks[i] for i in dropped), key=lambda b: -b.index):
            self._reroute(block.end, block.start)
        self.remove_dead()

    def _reroute(self, old: str, new: str) -> None:
        graph = self.model.graph
        for node in graph.node:
            for position, name in enumerate(node.input):
                if name == old:
                    node.input[position] = new
        if old in self.outputs:  # the graph output keeps its name; its old producer is now dead code
            for node in graph.node:
                for position, name in enumerate(node.output):
                    if name == old:
                        node.output[position] = f"{old}/dropped"
            graph.node.append(helper.make_node("Identity", [new], [old], name=f"{old}/dropped_block"))

    def remove_dead(self) -> None:
        graph = self.model.graph
        live = {v.name for v in graph.output}
        kept: list[onnx.NodeProto] = []
        for node in reversed(list(graph.node)):
            if any(name in live for name in node.output):
                kept.append(node)
                live.update(name for name in node.input if name)
        kept.reverse()
        del graph.node[:]
        graph.node.extend(kept)
        initializers = [t for t in graph.initializer if t.name in live]
        del graph.initializer[:]
        graph.initializer.extend(initializers)
        values = [v for v in graph.value_info if v.name in live]
        del graph.value_info[:]
        graph.value_info.extend(values)
        self.tensors = {t.name: t for t in graph.initializer}
        self.uses = Counter(name for node in graph.node for name in node.input if name)

    def finish(self) -> onnx.ModelProto:
        """Dead code removed, every stale shape annotation dropped and shapes inferred again."""
        self.remove_dead()
        del self.model.graph.value_info[:]
        return refresh_shapes(self.model, [])

    # ---- tensors -------------------------------------------------------------------------------------------------

    def _array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.tensors[name])

    def _replace(self, node: onnx.NodeProto, position: int, array: np.ndarray) -> None:
        """The node's input becomes `array`: in place when only this node reads it, else as its own copy."""
        name = node.input[position]
        if self.uses[name] == 1 and name not in self.outputs:
            self.tensors[name].CopyFrom(numpy_helper.from_array(array, name))
            return
        self._set_input(node, position, array, base=name)

    def _set_input(self, node: onnx.NodeProto, position: int, array: np.ndarray, base: str | None = None) -> None:
        name = self._fresh(f"{base or node.name or node.output[0]}.pruned")
        tensor = numpy_helper.from_array(array, name)
        self.model.graph.initializer.append(tensor)
        self.tensors[name] = self.model.graph.initializer[-1]
        old = node.input[position]
        self.uses[old] -= 1
        node.input[position] = name
        self.uses[name] += 1

    def _fresh(self, base: str) -> str:
        name, counter = base, 1
        while name in self.tensors:
            counter += 1
            name = f"{base}{counter}"
        return name
