from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from app.compression import data as model_data
from app.compression.context import StepContext, standalone_context
from app.compression.data import ModelData
from app.compression.graph import io_info
from tests.helpers import CNN, CNN_SAMPLES, MLP, MLP_SAMPLES, TRANSFORMER, TRANSFORMER_SAMPLES


def load_data(model: Path, samples: Path) -> ModelData:
    inputs, _ = io_info(model)
    return model_data.from_npz(samples, inputs)


@pytest.fixture(scope="session")
def cnn_data() -> ModelData:
    return load_data(CNN, CNN_SAMPLES)


@pytest.fixture(scope="session")
def mlp_data() -> ModelData:
    return load_data(MLP, MLP_SAMPLES)


@pytest.fixture(scope="session")
def transformer_data() -> ModelData:
    return load_data(TRANSFORMER, TRANSFORMER_SAMPLES)


@pytest.fixture
def make_ctx(tmp_path: Path) -> Callable[..., StepContext]:
    """`make_ctx(original, train=None)`: a step context with a private work folder under tmp_path."""
    counter = iter(range(1000))

    def build(original: Path, train: ModelData | None = None, seed: int = 0) -> StepContext:
        workdir = tmp_path / f"work-{next(counter)}"
        workdir.mkdir()
        return standalone_context(original, workdir, train, seed)

    return build


def top1(outputs: np.ndarray) -> np.ndarray:
    return np.asarray(np.argmax(outputs, axis=-1))


__all__ = ["CNN", "MLP", "TRANSFORMER", "load_data", "top1"]
