"""Transformer surgery on the ONNX graph: attention heads and FFN neurons sliced out, whole blocks dropped.

Every edit keeps the graph's interface. Heads: the kept heads' columns of Q, K and V (weights and biases) and
rows of the output projection; the head-split Reshapes get [0, 0, kept heads, head_dim] and the merge
[0, 0, kept heads × head_dim], so the exporter's own shape arithmetic (constants, or Concat of Shape/Gather) no
longer matters. Packed QKV and fused attention (`prune.packed`): the kept heads' columns in each of the Q, K and
V sections of the packed weight and bias, and every head count `packed.edits` found rewritten (Reshape targets,
Split sizes, Slice bounds, per-head masks, the fused op's attributes); nodes this adds go at the end, and the
graph is put back in order before dead code goes. FFN neurons: columns of the up-projection, rows of the
down-projection. Blocks: readers of a block's end read its start instead (the residual stream goes on), then
unreachable nodes and weights go. A weight another node also reads is copied before it is sliced.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from app.compression.prune.apply import refresh_shapes
from app.compression.prune.graphview import Projection
from app.compression.prune.layout import Edit, kept_columns
from app.compression.prune.transformer import Attention, Block, Ffn


class Surgery:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.tensors = {t.name: t for t in model.graph.initializer}
        self.uses = Counter(name for node in model.graph.node for name in node.input if name)
        self.outputs = {v.name for v in model.graph.output}
        self.taken = {name for node in model.graph.node for name in node.output}
        self.targets: dict[int, int] = {}
        """Reshape node -> its own copy of the Concat computing its target (see _own_target)."""
        self.appended = False
        """Nodes were added at the end (indices found before the surgery stay valid): sort before pruning."""
        self.original = len(model.graph.node)

    # ---- heads and neurons ---------------------------------------------------------------------------------------

    def keep_heads(self, attention: Attention, heads: Sequence[int]) -> None:
        if len(heads) == attention.heads:
            return
        if attention.packed is not None:
            self._keep_packed_heads(attention, heads)
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

    def _keep_packed_heads(self, attention: Attention, heads: Sequence[int]) -> None:
        packed, total = attention.packed, attention.heads
        assert packed is not None and total > 0, "packed attention's heads are known once shapes are measured"
        columns = kept_columns(packed.sections, heads, total)
        if packed.kind == "MultiHeadAttention":  # separate Q, K and V projections, each heads-major
            for projection, (_, width, stride) in zip((attention.query, attention.key, attention.value),
                                                      packed.sections, strict=True):
                self._slice_outputs(projection, kept_columns([(0, width, stride)], heads, total))
        else:
            self._slice_outputs(attention.query, columns)
        rows = np.concatenate([np.arange(h * attention.head_dim, (h + 1) * attention.head_dim) for h in heads])
        self._slice_inputs(attention.out, rows)
        for edit in packed.edits:
            self._edit(edit, heads, total, columns)

    def _edit(self, edit: Edit, heads: Sequence[int], total: int, columns: np.ndarray) -> None:
        node = self.model.graph.node[edit.node] if edit.owner < 0 else self._own_target(edit.owner)
        name = node.input[edit.position] if edit.position < len(node.input) else ""
        if edit.kind == "scale" and edit.values is not None:  # a constant: entries > 0 scale (0 copies, -1 infers)
            values, flags = np.array(edit.values, dtype=np.int64), np.array(edit.flags)
            dtype = self._array(name).dtype if name in self.tensors else np.dtype(np.int64)
            scaled = np.where(flags & (values > 0), values * len(heads) // total, values)
            self._set_input(node, edit.position, scaled.astype(dtype))
        elif edit.kind == "scale":  # computed from the unchanged input's shape: × kept / total
            flags = np.array(edit.flags)
            times = self._constant(np.where(flags, len(heads), 1).astype(np.int64), f"{name}.kept_heads")
            over = self._constant(np.where(flags, total, 1).astype(np.int64), f"{name}.all_heads")
            self._insert(node, edit.position, "Mul", [times])
            self._insert(node, edit.position, "Div", [over])
        elif edit.kind == "gather" and edit.values is not None:  # heads merged with the batch: split them out
            self._gather_merged(node, edit, heads, total)
        elif edit.kind == "gather":  # a per-head mask or bias: the kept heads' entries
            indices = self._constant(np.asarray(heads, dtype=np.int64), f"{name}.kept_heads")
            self._insert(node, edit.position, "Gather", [indices], axis=edit.axis)
        elif edit.kind == "columns":  # the fused op's packed bias
            self._replace(node, edit.position, np.take(self._array(name), columns, axis=0))
        elif edit.kind == "heads":
            for attribute in node.attribute:
                if attribute.name == "num_heads":
                    attribute.i = len(heads)
                elif attribute.name == "qkv_hidden_sizes":
                    attribute.ints[:] = [size * len(heads) // total for size in attribute.ints]

    def _gather_merged(self, node: onnx.NodeProto, edit: Edit, heads: Sequence[int], total: int) -> None:
        """x[..., outer × heads × inner, ...] split into (outer, heads, inner), the kept heads gathered, merged back:
        the axis sizes around it are read off x, as the exporter's own shape arithmetic would."""
        assert edit.values is not None
        source, axis, (outer, inner) = node.input[edit.position], edit.axis, edit.values
        names = {part: self._fresh(f"{source}.heads_{part}") for part in
                 ("shape", "before", "after", "split_shape", "split", "kept", "merged_shape", "merged")}
        self.taken.update(names.values())
        const = {key: self._constant(np.array(value, dtype=np.int64), f"{source}.heads_{key}") for key, value in (
            ("zero", [0]), ("axis", [axis]), ("next", [axis + 1]), ("end", [np.iinfo(np.int64).max]),
            ("parts", [outer, total, inner]), ("flat", [-1]), ("heads", list(heads)))}
        self.model.graph.node.extend([
            helper.make_node("Shape", [source], [names["shape"]]),
            helper.make_node("Slice", [names["shape"], const["zero"], const["axis"]], [names["before"]]),
            helper.make_node("Slice", [names["shape"], const["next"], const["end"]], [names["after"]]),
            helper.make_node("Concat", [names["before"], const["parts"], names["after"]], [names["split_shape"]],
                             axis=0),
            helper.make_node("Reshape", [source, names["split_shape"]], [names["split"]]),
            helper.make_node("Gather", [names["split"], const["heads"]], [names["kept"]], axis=axis + 1),
            helper.make_node("Concat", [names["before"], const["flat"], names["after"]], [names["merged_shape"]],
                             axis=0),
            helper.make_node("Reshape", [names["kept"], names["merged_shape"]], [names["merged"]]),
        ])
        self.uses[source] += 1  # read by the Shape and the Reshape now, no longer by the node
        node.input[edit.position] = names["merged"]
        self.uses[names["merged"]] += 1
        self.appended = True

    def _own_target(self, reshape: int) -> onnx.NodeProto:
        """The Concat computing this Reshape's target, copied for it alone (appended at the end)."""
        node = self.model.graph.node[reshape]
        if reshape not in self.targets:
            source = next(n for n in self.model.graph.node if n.output and n.output[0] == node.input[1])
            copy = onnx.NodeProto()
            copy.CopyFrom(source)
            copy.output[0] = copy.name = self._fresh(f"{source.output[0]}.heads")
            self.taken.add(copy.output[0])
            self.uses.update(name for name in copy.input if name)
            self.uses[node.input[1]] -= 1
            node.input[1] = copy.output[0]
            self.uses[copy.output[0]] += 1
            self.model.graph.node.append(copy)
            self.targets[reshape] = len(self.model.graph.node) - 1
            self.appended = True
        target: onnx.NodeProto = self.model.graph.node[self.targets[reshape]]
        return target

    def _constant(self, array: np.ndarray, base: str) -> str:
        name = self._fresh(base)
        self.model.graph.initializer.append(numpy_helper.from_array(array, name))
        self.tensors[name] = self.model.graph.initializer[-1]
        return name

    def _insert(self, node: onnx.NodeProto, position: int, op: str, extra: list[str], **attributes: int) -> None:
        """`op(input, *extra)` between the node and its input, appended at the end of the graph."""
        source = node.input[position]
        output = self._fresh(f"{source}.{op.lower()}")
        self.taken.add(output)
        added = helper.make_node(op, [source, *extra], [output], name=output)
        added.attribute.extend(helper.make_attribute(key, value) for key, value in attributes.items())
        self.model.graph.node.append(added)
        self.uses[source] += 1
        self.uses[node.input[position]] -= 1
        node.input[position] = output
        self.uses[output] += 1
        self.appended = True

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
        axis = 1 if projection.transposed else 0  # Gemm(transB=1) keeps its weight [out, in]
        self._replace(node, 1, np.take(self._array(node.input[1]), rows, axis=axis))

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
        if self.appended:
            self._sort()
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
        self.original = len(graph.node)
        self.tensors = {t.name: t for t in graph.initializer}
        self.uses = Counter(name for node in graph.node for name in node.input if name)

    def _sort(self) -> None:
        """The original nodes in their order, each node appended since placed right before its first reader."""
        nodes = list(self.model.graph.node)
        added = {name: node for node in nodes[self.original:] for name in node.output}
        placed: set[str] = set()
        order: list[onnx.NodeProto] = []

        def place(node: onnx.NodeProto) -> None:
            for name in node.input:
                if name in added and name not in placed:
                    placed.add(name)
                    place(added[name])
            order.append(node)

        for node in nodes[:self.original]:
            place(node)
        for node in nodes[self.original:]:
            if node.output[0] not in placed:
                placed.add(node.output[0])
                place(node)
        del self.model.graph.node[:]
        self.model.graph.node.extend(order)
        self.appended = False

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
        while name in self.tensors or name in self.taken:
            counter += 1
            name = f"{base}{counter}"
        return name
