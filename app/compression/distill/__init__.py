"""The `distill` step: a student trained on the original's outputs through the ONNX-to-torch bridge."""

from app.compression.distill.train import run

__all__ = ["run"]
