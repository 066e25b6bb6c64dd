"""Structured pruning, the graph side: dependency groups, the choice of channels, and the rewrite of the model."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from app.compression.graph import infer_shapes
from app.compression.prune.deps import Analysis, Shape


@dataclass
class Group:
    """Layers whose output channels are tied (through a residual Add, say) and must be pruned alike."""

    producers: list[int]
    classes: np.ndarray
    """Root atom of each channel class: the group's width."""
    reasons: list[str]
    """Why the group must stay as it is; empty when it can be pruned."""


def lift_constants(model: onnx.ModelProto) -> None:
    """Constant nodes become initializers, so per-channel constants can be sliced like any weight."""
    outputs = {v.name for v in model.graph.output}
    keep = []
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None \
                and node.output[0] not in outputs:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


def inferred_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Static shape knowledge: what the file declares plus what ONNX shape inference adds (None: unknown dim)."""
    try:
        inferred = infer_shapes(model)
    except Exception:  # inference is best effort; unknown shapes only make the analysis more cautious
        inferred = model
    shapes: dict[str, Shape] = {}
    graph = inferred.graph
    for value in [*graph.value_info, *graph.input, *graph.output]:
        tensor = value.type.tensor_type
        if value.type.HasField("tensor_type") and tensor.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    return shapes


def groups(analysis: Analysis) -> list[Group]:
    roots = analysis.roots()
    pinned: dict[int, str] = {}
    for atom, reason in analysis.pins.items():
        pinned.setdefault(int(roots[atom]), reason)
    parent = list(range(len(analysis.producers)))

    def find(index: int) -> int:
        while parent[index] != index:
            index = parent[index]
        return index

    first: dict[int, int] = {}
    for index, producer in enumerate(analysis.producers):
        for root in np.unique(roots[producer.layout.atoms]).tolist():
            other = first.setdefault(root, index)
            parent[find(index)] = find(other)
    members: dict[int, list[int]] = defaultdict(list)
    for index in range(len(analysis.producers)):
        members[find(index)].append(index)
    result = []
    for producers in members.values():
        atoms = np.concatenate([analysis.producers[i].layout.atoms for i in producers])
        classes = np.unique(roots[atoms])
        reasons = list(dict.fromkeys(pinned[r] for r in classes.tolist() if r in pinned))
        result.append(Group(producers, classes, reasons))
    return result


def keep_count(width: int, sparsity: float) -> int:
    return max(1, min(width, math.floor(width * (1.0 - sparsity) + 0.5)))


def choose(analysis: Analysis, roots: np.ndarray, group: Group, scores: list[np.ndarray],
           sparsity: float) -> np.ndarray:
    """Root atoms of the classes to remove: the least important, importance summed over the group's layers.

    Each layer's scores are divided by their mean first, so a layer with large weights does not outvote the
    others in a residual group. A class is spared when removing it would leave one of its layers no channel.
    """
    total = np.zeros(len(roots))
    remaining: dict[int, int] = {}
    members: dict[int, Counter[int]] = defaultdict(Counter)
    for index in group.producers:
        atoms = analysis.producers[index].layout.atoms
        score = np.asarray(scores[index], dtype=np.float64)
        mean = float(score.mean()) if score.size else 0.0
        np.add.at(total, roots[atoms], score / mean if mean > 0 else score)
        remaining[index] = len(atoms)
        for root in roots[atoms].tolist():
            members[root][index] += 1
    wanted = len(group.classes) - keep_count(len(group.classes), sparsity)
    removed: list[int] = []
    for root in group.classes[np.argsort(total[group.classes], kind="stable")].tolist():
        if len(removed) == wanted:
            break
        if all(remaining[p] > count for p, count in members[root].items()):
            for p, count in members[root].items():
                remaining[p] -= count
            removed.append(root)
    return np.array(removed, dtype=np.int64)


def rewrite(model: onnx.ModelProto, analysis: Analysis, roots: np.ndarray, removed_roots: np.ndarray) -> list[str]:
    """Slice every recorded constant; returns the tensors whose shape changed."""
    removed = np.isin(roots, removed_roots)
    graph = model.graph
    slices: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = defaultdict(list)
    for edit in analysis.edits:
        keep = np.nonzero(~removed[edit.atoms])[0]
        if len(keep) < len(edit.atoms):
            slices[(edit.node, edit.input)].append((edit.axis, keep))
    initializers = {t.name: t for t in graph.initializer}
    uses = _uses(graph)
    outside = {v.name for v in [*graph.input, *graph.output]}
    changed: list[str] = []

    def store(node_index: int, position: int, array: np.ndarray) -> None:
        node = graph.node[node_index]
        name = node.input[position]
        if uses[name] == 1 and name not in outside:
            initializers[name].CopyFrom(numpy_helper.from_array(array, name))
        else:  # shared with a node that keeps its width: give this node its own copy
            new = _unique(f"{name}.pruned", initializers)
            initializers[new] = numpy_helper.from_array(array, new)
            graph.initializer.append(initializers[new])
            node.input[position] = new
        changed.append(name)

    for (node_index, position), cuts in slices.items():
        array = numpy_helper.to_array(initializers[graph.node[node_index].input[position]])
        for axis, kept_positions in cuts:
            array = np.take(array, kept_positions, axis=axis)
        store(node_index, position, array)
    for flatten in analysis.shape_edits:
        kept = int(np.count_nonzero(~removed[flatten.atoms]))
        if kept < len(flatten.atoms):
            target = numpy_helper.to_array(initializers[graph.node[flatten.node].input[1]]).copy()
            target[-1] = kept
            store(flatten.node, 1, target)
    orphans = set(changed) - set(_uses(graph)) - outside
    if orphans:  # every user got its own copy
        remaining = [t for t in graph.initializer if t.name not in orphans]
        del graph.initializer[:]
        graph.initializer.extend(remaining)
    changed += [name for name, atoms in analysis.carried.items() if removed[atoms].any()]
    return changed


def _uses(graph: onnx.GraphProto) -> Counter[str]:
    """How often each name is read, subgraphs included."""
    counts: Counter[str] = Counter()
    for node in graph.node:
        counts.update(name for name in node.input if name)
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                counts.update(_uses(sub))
    return counts


def refresh_shapes(model: onnx.ModelProto, changed: list[str]) -> onnx.ModelProto:
    """Drop the now stale shapes of changed tensors, then let shape inference fill them in again."""
    stale = set(changed)
    keep = [v for v in model.graph.value_info if v.name not in stale]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    try:
        return infer_shapes(model, strict_mode=True)
    except Exception:  # a model inference cannot type (custom ops) is still valid without the annotations
        return model


def _unique(base: str, taken: dict[str, onnx.TensorProto]) -> str:
    name, counter = base, 1
    while name in taken:
        counter += 1
        name = f"{base}{counter}"
    return name
