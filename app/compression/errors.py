"""Errors of the compression library; the service layer maps them to HTTP answers."""

from __future__ import annotations


class CompressionError(Exception):
    """Base class: the message is written for the user who asked for the compression."""

    step: str | None = None
    """The step that failed ("step 2/3: quantize (static)", "normalize"), set by the recipe runner."""

    def describe(self) -> str:
        """The message with the step that failed, as users see it on a failed job."""
        return f"{self.step}: {self}" if self.step else str(self)


class InvalidRecipe(CompressionError):
    """The recipe cannot be applied as written (unknown op, bad parameter, wrong model kind)."""


class UnsupportedModel(CompressionError):
    """The model has nothing a step can work on (no MatMul for int4, no prunable layer)."""


class DataRequired(CompressionError):
    """The step needs a dataset (distillation, integer inputs without a declared range)."""


class StepFailed(CompressionError):
    """A step produced a model that fails its checks (checker, session, inputs and outputs)."""


class Cancelled(CompressionError):
    """The caller cancelled the run."""
