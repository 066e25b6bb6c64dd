"""Channel-dependency rules for ops that move, merge, reduce or normalize axes: Flatten, Reshape, Transpose, Concat,
Squeeze/Unsqueeze, Reduce*, LayerNormalization and Softmax. Linear layers and position-wise ops are in `deps`."""

from __future__ import annotations

import math

import numpy as np
import onnx

from app.compression.prune.deps import Analysis, AnalyzerCore, Layout, Shape, ShapeEdit, attr


class Analyzer(AnalyzerCore):
    def _flattened(self, node: onnx.NodeProto, label: str, layout: Layout, start: int) -> np.ndarray | None:
        """Atoms of [.., C, H, W] flattened from axis `start`: each channel covers H*W consecutive positions."""
        shape = self._shape(node.input[0])
        rank = len(shape) if shape is not None else layout.rank
        if shape is None or rank is None:
            self.result.pin(layout.atoms, f"{node.op_type} '{label}' flattens channels of unknown spatial size")
            return None
        start = start + rank if start < 0 else start
        channel = rank + layout.axis
        inner, outer = shape[channel + 1:], shape[start:channel]
        if channel < start:
            self.result.pin(layout.atoms, f"{node.op_type} '{label}' merges the channels into a leading axis")
            return None
        if any(d is None for d in (*inner, *outer)):
            self.result.pin(layout.atoms, f"{node.op_type} '{label}' flattens channels of unknown spatial size")
            return None
        repeat = math.prod(d for d in inner if d is not None)
        tile = math.prod(d for d in outer if d is not None)
        return np.tile(np.repeat(layout.atoms, repeat), tile)

    def _op_Flatten(self, index: int, node: onnx.NodeProto, label: str, tracked: dict[int, Layout]) -> None:
        if 0 in tracked:
            start = attr(node, "axis", 1)
            atoms = self._flattened(node, label, tracked[0], start if isinstance(start, int) else 1)
            if atoms is not None:
                self._set(node.output[0], Layout(-1, atoms, 2))

    def _op_Reshape(self, index: int, node: onnx.NodeProto, label: str, tracked: dict[int, Layout]) -> None:
        if 0 not in tracked:
            self._pin_all(tracked, f"Reshape '{label}' computes a shape from the channels")
            return
        layout = tracked[0]
        value, shape = self.const(node.input[1]), self._shape(node.input[0])
        why = f"Reshape '{label}' reshapes the pruned axis"
        if value is None or shape is None:
            self.result.pin(layout.atoms, f"{why} to a shape known only at run time (e.g. a split into heads)")
            return
        target = [int(d) for d in value.tolist()]
        start, copies = len(target) - 1, attr(node, "allowzero", 0) == 0
        # A flatten: the leading dimensions pass through unchanged, the rest collapse into the last one.
        leading_ok = start <= len(shape) and sum(d == -1 for d in target) <= 1 and all(
            d == -1 or (d == 0 and copies) or d == shape[i] for i, d in enumerate(target[:start]))
        rest = shape[start:] if leading_ok else ()
        static = all(d is not None for d in rest)
        if not leading_ok or not static or target[-1] not in (-1, math.prod(d for d in rest if d is not None)) \
                or (target[-1] == -1 and -1 in target[:start]):
            self.result.pin(layout.atoms, f"{why} in a way that is not a flatten")
            return
        atoms = self._flattened(node, label, layout, start)
        if atoms is not None:
            if target[-1] != -1:
                self.result.shape_edits.append(ShapeEdit(index, atoms))
            self._set(node.output[0], Layout(-1, atoms, len(target)))

    def _op_Transpose(self, index: int, node: onnx.NodeProto, label: str, tracked: dict[int, Layout]) -> None:
        layout = tracked.get(0)
        if layout is None:
            return
        perm = attr(node, "perm", None)
        rank = self._rank(node.input[0], layout)
        if perm is None and rank is not None:
            perm = list(reversed(range(rank)))
        if not isinstance(perm, list) or len(perm) + layout.axis < 0:
            self.result.pin(layout.atoms, f"Transpose '{label}' moves the channels to an unknown axis")
            return
        # A pure permutation: the channels keep their order, only their axis moves.
        moved = perm.index(len(perm) + layout.axis)
        self._set(node.output[0], Layout(moved - len(perm), layout.atoms, len(perm)))

    def _op_Concat(self, index: int, node: onnx.NodeProto, label: str, tracked: dict[int, Layout]) -> None:
        if not tracked:
            return
        axis = attr(node, "axis", 1)
        assert isinstance(axis, int)
        ranks = [len(s) for s in (self._shape(n) for n in node.input if n) if s is not None]
        ranks += [t.rank for t in tracked.values() if t.rank is not None]
        if axis >= 0:
            if not ranks:
                self._pin_all(tracked, f"Concat '{label}' joins tensors of unknown rank")
                return
            axis -= ranks[0]
        parts = []
        for position, name in enumerate(node.input):
            layout = tracked.get(position)
            if layout is not None:
                if layout.axis != axis:
                    self._pin_all(tracked, f"Concat '{label}' joins along another axis than the channels")
                    return
                parts.append(layout.atoms)
                continue
            shape = self._shape(name)
            size = shape[axis] if shape is not None and len(shape) >= -axis else None
            if size is None:
                self._pin_all(tracked, f"Concat '{label}' joins the channels with '{name}' of unknown width")
                return
            fixed = self.result.new_atoms(size, -1)  # channels no layer here controls
            self.result.pin(fixed, f"Concat '{label}' ties the channels to '{name}', which the pruner cannot change")
            parts.append(fixed)
        self._set(node.output[0], Layout(axis, np.concatenate(parts), ranks[0] if ranks else None))

    def _op_LayerNormalization(self, index: int, node: onnx.NodeProto, label: str,
                               tracked: dict[int, Layout]) -> None:
        self._normalized_after(node, label, tracked, "normalizes over")

    def _op_Softmax(self, index: int, node: onnx.NodeProto, label: str, tracked: dict[int, Layout]) -> None:
        self._normalized_after(node, label, tracked, "normalizes over")

    def _op_LogSoftmax(self, index: int, node: onnx.NodeProto, label: str, tracked: dict[int, Layout]) -> None:
        self._normalized_after(node, label, tracked, "normalizes over")

    def _normalized_after(self, node: onnx.NodeProto, label: str, tracked: dict[int, Layout], verb: str) -> None:
        """Ops that mix the axes from `axis` on: safe only when the channels lie before them."""
        layout = tracked.get(0)
        default = -1 if node.op_type == "LayerNormalization" or self._opset >= 13 else 1
        axis = attr(node, "axis", default)
        assert isinstance(axis, int)
        rank = self._rank(node.input[0], layout) if layout is not None else None
        if axis >= 0 and rank is not None:
            axis -= rank
        extra = any(node.output[1:]) or any(i != 0 for i in tracked)
        if layout is None or axis >= 0 or layout.axis >= axis or extra:
            self._pin_all(tracked, f"{node.op_type} '{label}' {verb} the channels")
            return
        self._set(node.output[0], layout)

    def _axes(self, node: onnx.NodeProto, rank: int) -> list[int] | None:
        """Constant `axes` (an input from opset 13/18 on, an attribute before), made non-negative; None: unknown."""
        if len(node.input) > 1 and node.input[1]:
            value = self.const(node.input[1])
            raw = None if value is None else [int(a) for a in value.ravel().tolist()]
        else:
            found = attr(node, "axes", None)
            raw = [int(a) for a in found] if isinstance(found, list) else None
        return None if raw is None else sorted({a + rank if a < 0 else a for a in raw})

    def _drop_axes(self, node: onnx.NodeProto, label: str, tracked: dict[int, Layout], keepdims: bool) -> None:
        """Reduce or Squeeze: safe when the channel axis is not among the removed axes."""
        layout = tracked.get(0)
        rank = self._rank(node.input[0], layout) if layout is not None else None
        axes = self._axes(node, rank) if rank is not None else None
        if layout is None or rank is None or len(tracked) > 1 or not axes or rank + layout.axis in axes:
            self._pin_all(tracked, f"{node.op_type} '{label}' may reduce over the channels")
            return
        if keepdims:
            self._set(node.output[0], layout)
            return
        channel = rank + layout.axis
        position, new_rank = channel - sum(a < channel for a in axes), rank - len(axes)
        self._set(node.output[0], Layout(position - new_rank, layout.atoms, new_rank))

    def _reduce(self, index: int, node: onnx.NodeProto, label: str, tracked: dict[int, Layout]) -> None:
        self._drop_axes(node, label, tracked, attr(node, "keepdims", 1) == 1)

    _op_ReduceMean = _op_ReduceSum = _op_ReduceMax = _op_ReduceMin = _op_ReduceProd = _reduce
    _op_ReduceL1 = _op_ReduceL2 = _op_ReduceSumSquare = _op_ReduceLogSum = _op_ReduceLogSumExp = _reduce

    def _op_Squeeze(self, index: int, node: onnx.NodeProto, label: str, tracked: dict[int, Layout]) -> None:
        self._drop_axes(node, label, tracked, keepdims=False)

    def _op_Unsqueeze(self, index: int, node: onnx.NodeProto, label: str, tracked: dict[int, Layout]) -> None:
        layout = tracked.get(0)
        rank = self._rank(node.input[0], layout) if layout is not None else None
        inserted = len(self._axes(node, 0) or []) if rank is not None else 0
        axes = self._axes(node, (rank or 0) + inserted)
        if layout is None or rank is None or len(tracked) > 1 or not axes or len(axes) != inserted:
            self._pin_all(tracked, f"{node.op_type} '{label}' inserts axes the pruner cannot place")
            return
        out_rank = rank + inserted
        kept = [i for i in range(out_rank) if i not in axes]  # where the input's axes land, in order
        self._set(node.output[0], Layout(kept[rank + layout.axis] - out_rank, layout.atoms, out_rank))


def analyze(model: onnx.ModelProto, shapes: dict[str, Shape]) -> Analysis:
    """The channel dependencies of `model`; `shapes` are the statically known tensor shapes."""
    return Analyzer(model, shapes).run()
