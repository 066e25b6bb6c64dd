"""Runs a recipe: each step on the previous step's output, each output checked, the result measured."""

from __future__ import annotations

import importlib
import json
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from app.compression import data as model_data
from app.compression import evaluate, graph
from app.compression.config import Budget, OptimizeStep, PruneStep, QuantizeStep, Recipe
from app.compression.context import AnyStep, StepContext, StepFunction
from app.compression.data import ModelData
from app.compression.errors import Cancelled, CompressionError, StepFailed
from app.compression.normalize import normalize
from app.compression.progress import CancelToken, ProgressFn, StepProgress, ignore_progress

EVAL_FRACTION = 0.3
# Share of the progress bar spent in the steps; the rest is the measurement.
_STEPS_SHARE = 0.85

# op -> module with a `run(model, output, step, ctx)`; imported on first use, so torch loads only for distill.
_STEP_MODULES = {
    "quantize": "app.compression.quantize",
    "prune": "app.compression.prune",
    "optimize": "app.compression.optimize",
    "distill": "app.compression.distill",
}


@dataclass
class Checkpoint:
    """Steps already done: the model after step `done - 1`, and their notes; a rerun starts at step `done`."""

    done: int
    model: Path
    notes: list[dict[str, Any]]
    normalize: dict[str, Any] | None = None


@dataclass
class Normalized:
    """The original in the form steps work on (see `normalize`), made once and shared by several recipes."""

    model: Path
    notes: dict[str, Any]


@dataclass
class RecipeResult:
    output: Path
    report: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)


def step_function(op: str) -> StepFunction:
    module = importlib.import_module(_STEP_MODULES[op])
    function: StepFunction = module.run
    return function


def describe_step(step: AnyStep) -> str:
    detail: str
    if isinstance(step, QuantizeStep):
        detail = step.mode
    elif isinstance(step, PruneStep):
        detail = f"{step.mode} {step.sparsity:g}"
    elif isinstance(step, OptimizeStep):
        detail = step.level
    else:
        detail = f"student {step.student}"
    return f"{step.op} ({detail})"


def prepare_data(original: Path, data: ModelData | None, seed: int) -> tuple[ModelData | None, ModelData]:
    """(shaping split, held-out split); without a dataset, generated inputs for both."""
    if data is None:
        data = model_data.synthetic_for(original, seed=seed)
    return data.split(EVAL_FRACTION, seed)


def normalized(original: Path, workdir: Path, data: ModelData | None, threads: int = 1) -> Normalized:
    """Normalize `original` into `workdir`; a failure names the normalization as the step that failed."""
    target = workdir / "normalized.onnx"
    try:
        notes = normalize(original, target, data, threads)
    except CompressionError as exc:
        exc.step = exc.step or "normalize"
        raise
    except Exception as exc:  # any tool's own error type: reported with the step, never as an internal error
        raise _unexpected("normalize", exc) from exc
    graph.restore_io_shapes(original, target)
    return Normalized(target, notes)


def run_recipe(
    *, original: Path, output: Path, recipe: Recipe, data: ModelData | None = None, budget: Budget | None = None,
    progress: ProgressFn = ignore_progress, cancel: CancelToken | None = None, seed: int = 0, threads: int = 1,
    resolve_model: Callable[[str], Path] | None = None, split: tuple[ModelData | None, ModelData] | None = None,
    resume: Checkpoint | None = None, on_step: Callable[[Checkpoint], None] | None = None,
    prepared: Normalized | None = None, timing_seconds: float = evaluate.MIN_TIMING_SECONDS,
) -> RecipeResult:
    """Apply `recipe` to `original`, write the result to `output` (plus a `.recipe.json` sidecar).

    Args:
        original: the uploaded model; also the teacher and the reference for every check.
        output: where the compressed model is written.
        recipe: validated steps (see `config.parse_recipe`).
        data: the dataset, or None to generate inputs from the model's declared shapes.
        budget: fidelity budget for `within_budget`; default agreement (classifiers) or cosine, max drop 0.01.
        progress: called with (fraction of the whole run, stage).
        cancel: checked between and inside steps.
        split: an already split (shaping, held-out) pair, so that several recipes share one held-out set.
        resume: steps finished by an earlier, interrupted run; the recipe goes on from the next step.
        on_step: called after each checked step, so the caller can keep a checkpoint.
        prepared: the original already normalized (by `normalized`), so several recipes normalize once.
        timing_seconds: how long each latency of the report is timed at least (longer: steadier figures).

    Raises:
        CompressionError: InvalidRecipe, UnsupportedModel, DataRequired, StepFailed, or Cancelled.
    """
    cancel = cancel or CancelToken()
    train, held_out = split if split is not None else prepare_data(original, data, seed)
    workdir = Path(tempfile.mkdtemp(prefix="slimserve-recipe-"))
    try:
        if resume is not None:
            current, normalize_notes = resume.model, resume.normalize
        else:
            prepared = prepared or normalized(original, workdir, train if train is not None else held_out, threads)
            current, normalize_notes = prepared.model, prepared.notes
        notes: list[dict[str, Any]] = list(resume.notes) if resume is not None else []
        count = len(recipe.steps)
        for index, step in enumerate(recipe.steps):
            if resume is not None and index < resume.done:
                continue
            cancel.check()
            stage = f"step {index + 1}/{count}: {describe_step(step)}"
            step_dir = workdir / f"step-{index}"
            step_dir.mkdir()
            ctx = StepContext(
                original=original, workdir=step_dir,
                # Generated inputs may calibrate a quantizer, but teaching a student on noise is meaningless.
                train=None if step.op == "distill" and train is not None and train.source == "synthetic" else train,
                progress=StepProgress(progress, _STEPS_SHARE * index / count, _STEPS_SHARE * (index + 1) / count,
                                      stage, cancel),
                seed=seed, threads=threads, resolve_model=resolve_model,
            )
            ctx.progress(0.0)
            step_output = workdir / f"step-{index}.onnx"
            step_notes = _run_step(step, current, step_output, ctx, original, stage)
            notes.append({"step": step.model_dump(), "notes": step_notes})
            current = step_output
            if on_step is not None and index + 1 < count:
                on_step(Checkpoint(done=index + 1, model=current, notes=list(notes), normalize=normalize_notes))
        cancel.check()
        graph.without_shape_annotations(current)
        try:
            report = evaluate.measure(
                original, current, held_out, budget=budget, threads=threads, timing_seconds=timing_seconds,
                progress=lambda f, s: progress(_STEPS_SHARE + (1 - _STEPS_SHARE) * f, s),
            )
        except CompressionError:
            raise
        except Exception as exc:
            raise _unexpected("measuring the variant against the original", exc) from exc
        if held_out.source == "synthetic":
            report["fidelity"]["synthetic_inputs"] = model_data.plan_synthetic(original, seed).describe()
        report["normalize"] = normalize_notes
        report["steps"] = notes
        graph.copy_model(current, output)
        evaluate.renamed(report, output)
        write_sidecar(output, recipe, report)
        return RecipeResult(output=output, report=report, steps=notes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_step(step: AnyStep, model: Path, output: Path, ctx: StepContext, original: Path,
              stage: str) -> dict[str, Any]:
    """One step and its checks; every failure is a CompressionError that names the step."""
    try:
        notes = step_function(step.op)(model, output, step, ctx)
        graph.restore_io_shapes(original, output)
        graph.check_step_output(original, output, describe_step(step))
        return notes
    except Cancelled:
        raise
    except CompressionError as exc:
        exc.step = exc.step or stage
        raise
    except Exception as exc:  # a tool's own error (onnxruntime, onnx, torch): named, never an internal error
        raise _unexpected(stage, exc) from exc


def _unexpected(stage: str, exc: Exception) -> StepFailed:
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    failed = StepFailed(f"{type(exc).__name__}: {text}; this recipe cannot handle this model as it is: "
                        "try another preset, or report the model so the step can learn it")
    failed.step = stage
    return failed


def write_sidecar(output: Path, recipe: Recipe, report: dict[str, Any]) -> Path:
    """Every artifact carries the recipe, the library versions and the report that produced it."""
    sidecar = output.with_suffix(".recipe.json")
    payload = {
        "recipe": recipe.model_dump(),
        "versions": {"onnx": onnx.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "report": report,
    }
    sidecar.write_text(json.dumps(payload, indent=2, default=str))
    return sidecar
