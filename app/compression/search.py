"""`auto`: try the recipes that suit the model, measure each on one held-out set, keep the best within budget."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from app.compression import graph
from app.compression.config import Budget, Recipe, parse_recipe
from app.compression.data import ModelData
from app.compression.errors import Cancelled, CompressionError
from app.compression.evaluate import MIN_TIMING_SECONDS, renamed
from app.compression.progress import CancelToken, ProgressFn, ignore_progress
from app.compression.recipes import normalized, prepare_data, run_recipe, write_sidecar

Objective = Literal["size", "latency", "balanced"]
Family = Literal["transformer", "cnn", "mlp"]

_STEPS: dict[str, list[dict[str, Any]]] = {
    "optimize-transformer": [{"op": "optimize", "level": "transformer"}],
    "shrink-50+int8-static": [{"op": "prune", "mode": "structured", "sparsity": 0.5}, {"op": "distill"},
                              {"op": "quantize", "mode": "static"}],
    "shrink-50+int8-dynamic": [{"op": "prune", "mode": "structured", "sparsity": 0.5}, {"op": "distill"},
                               {"op": "quantize", "mode": "dynamic"}],
    # Convolutions kept float: on PaddleOCR's recognizer (convolutions and attention) the INT8 convolutions
    # cost the budget (cosine 0.989 with them, 0.9997 without).
    "int8-dynamic-matmul": [{"op": "optimize", "level": "auto"},
                            {"op": "quantize", "mode": "dynamic", "op_types": ["MatMul"]}],
}
CANDIDATES: dict[Family, list[str]] = {
    "transformer": ["optimize-transformer", "int8-dynamic", "int4-weight", "fp16"],
    "cnn": ["int8-static", "shrink-50", "shrink-50+int8-static"],
    "mlp": ["int8-dynamic", "int8-static", "shrink-50", "shrink-50+int8-dynamic"],
}
_NEEDS_REAL_DATA = {"shrink-50", "shrink-50+int8-static", "shrink-50+int8-dynamic", "shrink-50-int8"}


@dataclass
class SearchResult:
    output: Path | None
    """The chosen candidate's file, or None when every candidate failed."""
    winner: str | None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] | None = None
    within_budget: bool = False
    """False when no candidate met the budget (or the speed goal) and `winner` is the one nearest to it."""


def model_family(path: Path) -> Family:
    family: Family = graph.model_family(graph.load(path))  # type: ignore[assignment]
    return family


def candidate_names(original: Path, family: Family) -> list[str]:
    """The family's candidates; a transformer with convolutions (a CNN front, a ViT's patch embedding) also
    tries INT8 on its MatMuls alone, and every transformer a structured cut with distillation and INT8 (given
    real data)."""
    names = list(CANDIDATES[family])
    proto = graph.load(original, weights=False)
    if family == "transformer" and any(n.op_type == "Conv" for n in proto.graph.node):
        names.insert(names.index("int8-dynamic") + 1, "int8-dynamic-matmul")
    if family == "transformer":  # heads, neurons and blocks removed, then INT8 (embedding tables in 4 bits)
        tables = graph.constant_names(proto)
        embedded = any(n.op_type == "Gather" and n.input[0] in tables for n in proto.graph.node)
        names.append("shrink-50-int8" if embedded else "shrink-50+int8-dynamic")
    return names


def candidate_recipe(name: str) -> Recipe:
    return parse_recipe({"steps": _STEPS[name], "name": name}) if name in _STEPS else parse_recipe(name)


# Below this a candidate is slower than the original; above it, timing noise (equal models measure 0.97-1.03).
SLOWER_BELOW = 0.95


def score(report: dict[str, Any], objective: Objective) -> float | None:
    """Higher is better; None when the candidate is not eligible (over budget, or slower for a speed goal)."""
    if not report.get("within_budget"):
        return None
    speedup = report["speedup"]["batch_n"] or report["speedup"]["batch_1"]
    if objective == "size":
        return -float(report["size_ratio"])
    if speedup < SLOWER_BELOW:
        return None  # never hand back a slower model unless only size matters
    if objective == "latency":
        return float(speedup)
    return float((speedup / report["size_ratio"]) ** 0.5)


def dropped_because(report: dict[str, Any], objective: Objective) -> str | None:
    """Why an eligible-looking candidate does not count, in words; None when it is eligible."""
    if not report.get("within_budget"):
        budget = report.get("budget") or {}
        return f"over budget ({budget.get('metric')} drop above {budget.get('max_drop')})"
    speedup = report["speedup"]["batch_n"] or report["speedup"]["batch_1"]
    if objective != "size" and speedup < SLOWER_BELOW:
        return f"slower than the original ({speedup:.2f}x) and the objective is {objective}"
    return None


def closeness(report: dict[str, Any]) -> tuple[bool, float]:
    """The fallback's order when no candidate is eligible: within budget first (then the fastest: every one was
    slower than the original), else the nearest to the original on the budget's metric."""
    if report.get("within_budget"):
        return True, float(report["speedup"]["batch_n"] or report["speedup"]["batch_1"])
    fidelity, metric = report["fidelity"], (report.get("budget") or {}).get("metric", "cosine")
    value = {"agreement": fidelity.get("agreement"), "accuracy": fidelity.get("accuracy"),
             "cosine": fidelity.get("cosine_mean")}.get(metric)
    return False, float(value if value is not None else fidelity.get("cosine_mean") or 0.0)


def _slice(progress: ProgressFn, start: float, end: float, name: str) -> ProgressFn:
    def report(fraction: float, stage: str) -> None:
        progress(start + (end - start) * fraction, f"{name}: {stage}")

    return report


def search(
    *, original: Path, output: Path, data: ModelData | None, budget: Budget | None = None,
    objective: Objective = "balanced", progress: ProgressFn = ignore_progress, cancel: CancelToken | None = None,
    seed: int = 0, threads: int = 1, resolve_model: Callable[[str], Path] | None = None,
    split: tuple[ModelData | None, ModelData] | None = None, timing_seconds: float = MIN_TIMING_SECONDS,
) -> SearchResult:
    """Run every candidate recipe for the model's family; all reports are returned, the best one is written.

    The best is the highest-scoring candidate within budget; when none is, the one measured closest to the
    original (`SearchResult.within_budget` False says so). Only when every candidate failed is there none.
    """
    cancel = cancel or CancelToken()
    family = model_family(original)
    names = candidate_names(original, family)
    split = split if split is not None else prepare_data(original, data, seed)
    real_data = split[1].source == "dataset"
    workdir = Path(tempfile.mkdtemp(prefix="slimserve-auto-"))
    candidates: list[dict[str, Any]] = []
    best: tuple[float, str, Path, dict[str, Any], Recipe] | None = None
    nearest: tuple[tuple[bool, float], str, Path, dict[str, Any], Recipe] | None = None
    try:
        prepared = normalized(original, workdir, split[0] if split[0] is not None else split[1], threads)
        for index, name in enumerate(names):
            cancel.check()
            entry: dict[str, Any] = {"name": name, "family": family, "report": None, "error": None}
            candidates.append(entry)
            recipe = candidate_recipe(name)
            entry["recipe"] = recipe.model_dump()
            if name in _NEEDS_REAL_DATA and not real_data:
                entry["error"] = "skipped: distillation needs a dataset"
                continue
            path = workdir / f"{index}.onnx"
            try:
                result = run_recipe(
                    original=original, output=path, recipe=recipe, budget=budget, cancel=cancel, seed=seed,
                    threads=threads, resolve_model=resolve_model, split=split, prepared=prepared,
                    timing_seconds=timing_seconds,
                    progress=_slice(progress, index / len(names), (index + 1) / len(names), name),
                )
            except Cancelled:
                raise
            except CompressionError as exc:
                entry["error"] = f"{type(exc).__name__}: {exc.describe()}"
                continue
            entry["report"] = result.report
            value = score(result.report, objective)
            entry["score"] = value
            entry["dropped"] = dropped_because(result.report, objective)
            if value is not None and (best is None or value > best[0]):
                best = (value, name, path, result.report, recipe)
            near = closeness(result.report)
            if nearest is None or near > nearest[0]:
                nearest = (near, name, path, result.report, recipe)
        chosen = best or nearest
        if chosen is None:
            return SearchResult(output=None, winner=None, candidates=candidates)
        _, name, path, report, recipe = chosen
        graph.copy_model(path, output)
        report = dict(report)
        renamed(report, output)
        report = {**report, "auto": {
            "winner": name, "objective": objective, "within_budget": best is not None,
            "chosen_because": "the best candidate within budget" if best is not None else
            "every candidate within budget was slower than the original: this is the fastest of them"
            if report.get("within_budget") else
            "no candidate met the budget: this is the one measured closest to the original"}}
        write_sidecar(output, recipe, {**report, "auto": {**report["auto"], "candidates": candidates}})
        return SearchResult(output=output, winner=name, candidates=candidates, report=report,
                            within_budget=best is not None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
