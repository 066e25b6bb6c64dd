"""The `distill` step: a student trained on the original's outputs through the ONNX-to-torch bridge.

torch is imported on first use, so the coverage check (`bridge.coverage`) stays importable by the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.compression.config import DistillStep
from app.compression.context import StepContext


def run(model: Path, output: Path, step: DistillStep, ctx: StepContext) -> dict[str, Any]:
    from app.compression.distill.train import run as train

    return train(model, output, step, ctx)
