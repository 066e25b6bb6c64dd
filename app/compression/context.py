"""What every step receives besides its model and config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from app.compression.config import DistillStep, OptimizeStep, PruneStep, QuantizeStep
from app.compression.data import ModelData
from app.compression.progress import CancelToken, StepProgress, ignore_progress


@dataclass
class StepContext:
    original: Path
    """The model as uploaded: the teacher for distillation, the reference for checks."""
    workdir: Path
    """A private scratch folder for this step; the runner removes it."""
    train: ModelData | None
    """Samples that may shape the model (calibration, training); never the held-out evaluation split."""
    progress: StepProgress
    seed: int = 0
    threads: int = 1
    """onnxruntime intra-op threads for anything a step measures."""
    resolve_model: Callable[[str], Path] | None = None
    """Finds another uploaded model by name (a distillation student)."""
    notes: dict[str, Any] = field(default_factory=dict)


def standalone_context(original: Path, workdir: Path, train: ModelData | None = None, seed: int = 0) -> StepContext:
    """A context for calling one step directly, from a script or a test."""
    return StepContext(original=original, workdir=workdir, train=train,
                       progress=StepProgress(ignore_progress, 0.0, 1.0, "step", CancelToken()), seed=seed)


class StepFunction(Protocol):
    """Path in, path out; returns notes for the report (what was quantized, pruned, fused, skipped and why)."""

    def __call__(self, model: Path, output: Path, step: Any, ctx: StepContext) -> dict[str, Any]: ...


AnyStep = QuantizeStep | PruneStep | OptimizeStep | DistillStep
