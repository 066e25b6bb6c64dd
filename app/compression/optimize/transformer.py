"""The `transformer` optimize level: fusions, each kept only if the measurements say it pays on this CPU.

Measured on the tiny transformer (hidden 64, one thread): our packed-QKV Attention fusion is faster at every
batch size, while onnxruntime's SkipLayerNormalization fusion is 15-25% slower than the Add + LayerNormalization
pair it replaces. So every fusion family that fires is tried without, one at a time, and dropped when the
model is faster without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model

from app.compression import graph
from app.compression.graph import op_counts, prune_opsets
from app.compression.optimize.attention import Fused, detect_heads, fuse_attention
from app.compression.optimize.separate_attention import fuse_separate_attention

# family -> (FusionOptions switches, op types that show it fired)
FAMILIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "attention": (("enable_attention",), ("Attention", "MultiHeadAttention")),
    "skip_layer_norm": (("enable_skip_layer_norm", "enable_bias_skip_layer_norm"),
                        ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")),
    "gelu": (("enable_gelu", "enable_bias_gelu"), ("Gelu", "BiasGelu", "FastGelu")),
    "layer_norm": (("enable_layer_norm",), ("LayerNormalization", "SimplifiedLayerNormalization")),
    "embed_layer_norm": (("enable_embed_layer_norm",), ("EmbedLayerNormalization",)),
}
# A variant must beat the current one by this factor (geometric mean over batch sizes) to replace it.
_BETTER_BY = 1.03

Check = Callable[[Path], dict[str, Any] | None]
"""Outputs against the input model; raises StepFailed when they differ."""
Speed = Callable[[Path], dict[str, float]]
"""Speedup against the input model per batch size."""


@dataclass
class Variant:
    disabled: frozenset[str]
    path: Path
    fired: list[str]
    statistics: dict[str, int]
    fidelity: dict[str, Any] | None
    speedup: dict[str, float] = field(default_factory=dict)

    def score(self) -> float:
        return math.exp(sum(math.log(v) for v in self.speedup.values()) / len(self.speedup)) if self.speedup else 1.0


class TransformerFusions:
    def __init__(self, model: Path, workdir: Path, check: Check) -> None:
        self.model, self.workdir, self.check = model, workdir, check
        self.notes: dict[str, Any] = {"optimizer": "onnxruntime.transformers.optimizer", "model_type": "bert"}
        self.fused_proto, self.fused = self._own_fusion(fuse_attention, "packed_attention")
        detected = None if self.fused.count else detect_heads(graph.load(model))
        self.heads, self.hidden = (self.fused.num_heads, self.fused.hidden_size) if self.fused.count else \
            detected or (0, 0)
        self.heads_source = "the packed attention blocks" if self.fused.count else \
            "the split into heads of the Q/K/V projections" if detected else "not found: attention stays unfused"

    def _own_fusion(self, fuse: Callable[[onnx.ModelProto], Fused],
                    label: str) -> tuple[onnx.ModelProto | None, Fused]:
        """One of our attention fusions on the input, kept only if the fused model computes the same."""
        proto = graph.load(self.model)
        fused = fuse(proto)
        self.notes[f"{label}_fused"] = fused.count
        if not fused.count:
            return None, fused
        path = graph.save(proto, self.workdir / f"{label}.onnx")
        try:
            self.check(path)
        except Exception as exc:  # StepFailed or onnxruntime's refusal: a wrong match; other fusions still run
            self.notes.update({f"{label}_fused": 0, f"{label}_rejected": str(exc)[:300]})
            return None, Fused(0, 0, 0)
        return proto, fused

    def build(self, disabled: frozenset[str]) -> Variant:
        options = FusionOptions("bert")
        for family in disabled:
            for switch in FAMILIES[family][0]:
                setattr(options, switch, False)
        use_ours = self.fused_proto is not None and "attention" not in disabled
        source = self.fused_proto if use_ours and self.fused_proto is not None else graph.load(self.model)
        if not self.heads:
            options.enable_attention = False  # the optimizer would guess, and log that it cannot
        if not _layer_norm_can_be_declared(source):
            options.enable_layer_norm = False
        # opt_level 0: Python fusions only, so the saved graph has no provider-specific layout.
        optimized = optimize_model(_copy(source), model_type="bert", num_heads=self.heads, hidden_size=self.hidden,
                                   opt_level=0, optimization_options=options)
        result: onnx.ModelProto = optimized.model
        prune_opsets(result)
        _declare_layer_norm(result)
        tag = "-".join(sorted(disabled)) or "all"
        path = graph.save(result, self.workdir / f"transformer-{tag}.onnx")
        statistics = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        return Variant(disabled, path, _fired(self.model, result), statistics, self.check(path))

    def search(self, speed: Speed | None) -> Variant:
        """All fusions, then each fired family dropped in turn, kept dropped when that is measurably faster.

        When even the best is not faster than the input (measured), the input itself is the answer: a fusion
        is kept only where it pays.
        """
        best = self.build(frozenset())
        tried = [best]
        if speed is not None:
            best.speedup = speed(best.path)
            if "attention" not in best.fired and self.fused_proto is None and self.heads:
                best = self._try_separate_attention(best, speed, tried)
            for family in list(best.fired):
                variant = self.build(best.disabled | {family})
                variant.speedup = speed(variant.path)
                tried.append(variant)
                if variant.score() > best.score() * _BETTER_BY:
                    best = variant
            if best.score() < 1.0:
                unchanged = Variant(frozenset(FAMILIES), self.model, [], {}, None, dict.fromkeys(best.speedup, 1.0))
                self.notes["kept_input"] = (f"no combination of fusions was faster than the input "
                                            f"(best {best.score():.2f}x): the model is left as it was")
                best = unchanged
        self.notes.update({
            "num_heads": self.heads, "hidden_size": self.hidden, "num_heads_source": self.heads_source,
            "fusions_kept": best.fired, "fusions_dropped": sorted(best.disabled),
            "optimizer_statistics": best.statistics, "fidelity": best.fidelity,
            "fusion_search": [{"without": sorted(v.disabled), "fired": v.fired, "speedup": v.speedup}
                              for v in tried],
        })
        return best

    def _try_separate_attention(self, best: Variant, speed: Speed, tried: list[Variant]) -> Variant:
        """onnxruntime fused no attention: ours for separate Q/K/V projections, kept if it is faster."""
        proto, fused = self._own_fusion(fuse_separate_attention, "separate_attention")
        if proto is None:
            return best
        self.fused_proto, self.fused = proto, fused
        variant = self.build(frozenset())
        variant.speedup = speed(variant.path)
        tried.append(variant)
        if variant.score() > best.score() * _BETTER_BY:
            return variant
        self.fused_proto, self.fused = None, Fused(0, 0, 0)
        self.notes["separate_attention_dropped"] = f"not faster ({variant.score():.2f}x against {best.score():.2f}x)"
        return best


# ONNX defines LayerNormalization from opset 17; onnxruntime's fusion writes it at any opset (onnxruntime runs it
# as its own). Raising an opset-13..16 model to 17 changes no other operator it uses, except RoiAlign's default.
_LAYER_NORM_OPSET = 17
_CHANGED_BEFORE_17 = {"RoiAlign"}


def _layer_norm_can_be_declared(model: onnx.ModelProto) -> bool:
    opset = graph.default_opset(model)
    return opset >= _LAYER_NORM_OPSET or (
        opset >= 13 and not any(n.op_type in _CHANGED_BEFORE_17 for n in graph.all_nodes(model)))


def _declare_layer_norm(model: onnx.ModelProto) -> None:
    """The fused model at the opset that defines its LayerNormalization nodes, so the ONNX checker accepts it."""
    if graph.default_opset(model) >= _LAYER_NORM_OPSET or not any(
            n.op_type == "LayerNormalization" and n.domain in ("", "ai.onnx") for n in graph.all_nodes(model)):
        return
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = _LAYER_NORM_OPSET


def _fired(model: Path, result: onnx.ModelProto) -> list[str]:
    before, after = op_counts(graph.load(model)), op_counts(result)

    def grew(op: str) -> bool:
        return any(after.get(name, 0) > before.get(name, 0) for name in (op, f"com.microsoft:{op}"))

    return [family for family, (_, ops) in FAMILIES.items() if any(grew(op) for op in ops)]


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(proto)
    return copied
