"""SmoothQuant (Xiao et al., 2023), folded exactly into the LayerNormalization before the MatMuls it feeds.

Transformer activations after a LayerNorm carry a few outlier channels that stretch a per-tensor int8 range
until the other channels round to a handful of levels. Dividing channel j of the LayerNorm's output by s_j and
multiplying row j of every MatMul weight that reads it by s_j leaves the float function unchanged while it moves
the outliers into the weights, which are quantized per output channel and absorb them: s_j = max|x_j|^α /
max|w_j|^(1-α). The division goes into the LayerNorm's scale and bias, so it costs nothing at run time. A
reader of that output that is not such a MatMul (a residual Add in post-LN BERT, a graph output) is given the
original value back through one Mul by s, which keeps the transform exact for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from app.compression.graph import constant_names
from app.compression.scoring import session_exposing

# Bounds on a channel's factor: a dead channel (max |x| = 0) or an all-zero weight row is left alone.
_MIN_FACTOR, _MAX_FACTOR = 1e-4, 1e4


@dataclass
class Site:
    """One LayerNorm output and what reads it."""

    norm: onnx.NodeProto
    matmuls: list[onnx.NodeProto]
    """MatMuls reading it as their first input by a constant [channels, n] weight: they absorb the factors."""
    shapes: list[onnx.NodeProto]
    """Shape readers: they may read the smoothed value, its shape is the same."""
    restored: bool
    """Other readers (or a graph output) exist and get the unsmoothed value back through a Mul."""


def sites(model: onnx.ModelProto) -> list[Site]:
    """The LayerNorms with constant scale and bias whose output feeds at least one weight MatMul."""
    constants = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    found = []
    for node in model.graph.node:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx") or len(node.output) < 1:
            continue
        if not all(name in constants for name in node.input[1:3] if name):
            continue
        out = node.output[0]
        matmuls = [r for r in readers.get(out, []) if r.op_type == "MatMul" and r.input[0] == out
                   and r.input[1] in constants and len(constants[r.input[1]].dims) == 2]
        shapes = [r for r in readers.get(out, []) if r.op_type == "Shape"]  # the shape is unchanged: no Mul needed
        if matmuls:
            restored = out in outputs or len(matmuls) + len(shapes) < len(readers.get(out, []))
            found.append(Site(node, matmuls, shapes, restored))
    return found


def channel_maxima(model: onnx.ModelProto, found: Sequence[Site], feeds: Sequence[dict[str, np.ndarray]],
                   threads: int = 1) -> dict[str, np.ndarray]:
    """max |x_j| of each site's LayerNorm output over the calibration batches, per channel."""
    names = [site.norm.output[0] for site in found]
    session = session_exposing(model, names, threads)
    maxima: dict[str, np.ndarray] = {}
    for batch in feeds:
        for name, value in zip(names, session.run(names, batch), strict=True):
            flat = np.abs(np.asarray(value, dtype=np.float64)).reshape(-1, value.shape[-1]).max(axis=0)
            maxima[name] = np.maximum(maxima[name], flat) if name in maxima else flat
    return maxima


def smooth(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], alpha: float,
           threads: int = 1) -> dict[str, Any]:
    """Apply the migration in place at every site; returns what was done for the notes."""
    found = sites(model)
    if not found:
        return {"alpha": alpha, "layer_norms": 0, "reason": "no LayerNormalization feeds a MatMul by a weight"}
    maxima = channel_maxima(model, found, feeds, threads)
    rewriter = _Rewriter(model)
    spreads = []
    for site in found:
        weights = [rewriter.array(m.input[1]) for m in site.matmuls]
        activation = maxima[site.norm.output[0]]
        weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        factors = _factors(activation, weight_max, alpha)
        spreads.append(float(activation.max() / max(float(np.median(activation)), 1e-12)))
        rewriter.divide_norm(site.norm, factors)
        for matmul, weight in zip(site.matmuls, weights, strict=True):
            rewriter.set(matmul, 1, weight * factors[:, None])
        if site.restored:
            rewriter.restore(site, factors)
    rewriter.insert_restoring_muls()
    return {"alpha": alpha, "layer_norms": len(found),
            "restoring_muls": sum(site.restored for site in found),
            "matmuls_smoothed": sum(len(site.matmuls) for site in found),
            "outlier_ratio_max": round(max(spreads), 2)}


def _factors(activation: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    usable = (activation > 0) & (weight_max > 0)
    factors = np.ones_like(activation)
    factors[usable] = activation[usable] ** alpha / weight_max[usable] ** (1.0 - alpha)
    return np.asarray(np.clip(factors, _MIN_FACTOR, _MAX_FACTOR))


class _Rewriter:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.constants = {t.name: t for t in model.graph.initializer}
        self.uses: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1
        self.taken = constant_names(model) | {o for n in model.graph.node for o in n.output}
        self.pending: dict[str, onnx.NodeProto] = {}
        """smoothed LayerNorm output -> the Mul that restores it, placed right after the LayerNorm"""

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.constants[name]).astype(np.float64)

    def set(self, node: onnx.NodeProto, position: int, value: np.ndarray) -> None:
        """Replace a constant input; a constant other nodes share gets a copy of its own."""
        name = node.input[position]
        source = self.constants[name]
        array = value.astype(numpy_helper.to_array(source).dtype)
        if self.uses.get(name, 0) > 1:
            self.uses[name] -= 1
            name = self._fresh(f"{name}_smoothed")
            node.input[position] = name
            self.model.graph.initializer.append(numpy_helper.from_array(array, name))
            self.constants[name] = self.model.graph.initializer[-1]
            self.uses[name] = 1
        else:
            source.CopyFrom(numpy_helper.from_array(array, name))

    def divide_norm(self, norm: onnx.NodeProto, factors: np.ndarray) -> None:
        for position in (1, 2):
            if len(norm.input) > position and norm.input[position]:
                self.set(norm, position, self.array(norm.input[position]) / factors)

    def restore(self, site: Site, factors: np.ndarray) -> None:
        """The LayerNorm now writes the smoothed value under a new name; a Mul gives the old name its value."""
        original = site.norm.output[0]
        smoothed = self._fresh(f"{original}_smoothed")
        site.norm.output[0] = smoothed
        for reader in [*site.matmuls, *site.shapes]:
            reader.input[0] = smoothed
        dtype = numpy_helper.to_array(self.constants[site.matmuls[0].input[1]]).dtype
        scale = self._fresh(f"{original}_smoothing_undo")
        self.model.graph.initializer.append(numpy_helper.from_array(factors.astype(dtype), scale))
        self.pending[smoothed] = onnx.helper.make_node("Mul", [smoothed, scale], [original],
                                                             name=self._fresh(f"{site.norm.name or original}_undo"))

    def insert_restoring_muls(self) -> None:
        """Once, at the end: rebuilding the node list detaches the node objects the sites hold."""
        if not self.pending:
            return
        nodes = []
        for node in self.model.graph.node:
            nodes.append(node)
            if node.output and node.output[0] in self.pending:
                nodes.append(self.pending[node.output[0]])
        rebuilt = [onnx.NodeProto() for _ in nodes]
        for copy, node in zip(rebuilt, nodes, strict=True):
            copy.CopyFrom(node)
        del self.model.graph.node[:]
        self.model.graph.node.extend(rebuilt)

    def _fresh(self, base: str) -> str:
        name, index = base, 1
        while name in self.taken:
            index += 1
            name = f"{base}_{index}"
        self.taken.add(name)
        return name
