"""Data for calibration, training and evaluation: a dataset's arrays, or inputs generated from the model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from app.compression.errors import DataRequired, InvalidRecipe
from app.compression.graph import TensorInfo, io_info, session

SYNTHETIC_SAMPLES = 256
# Sizes tried for the dynamic dimensions other than the batch, in order: a sequence length first, then the
# multiples of 32 and 64 that strided CNNs (detectors, FPNs) need, small to large, then the odd ones out.
SYNTHETIC_DYNAMIC_SIZES = (16, 32, 64, 128, 224, 256, 320, 512, 48, 8, 1)
_PROBE_ROWS = 2
_PROBE_SECONDS = 30.0


@dataclass
class ModelData:
    """Samples along the first axis of every array, already in the model's dtypes."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: Literal["dataset", "synthetic"]

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def subset(self, index: np.ndarray) -> ModelData:
        labels = self.labels[index] if self.labels is not None else None
        return ModelData({k: v[index] for k, v in self.inputs.items()}, labels, self.source)

    def take(self, count: int) -> ModelData:
        return self.subset(np.arange(min(count, len(self))))

    def split(self, eval_fraction: float, seed: int) -> tuple[ModelData, ModelData]:
        """(shaping split, held-out split): fidelity is never measured on samples that shaped the model."""
        if len(self) < 2:
            raise DataRequired("the dataset needs at least 2 samples: one to shape the model, one to measure it")
        order = np.random.default_rng(seed).permutation(len(self))
        held_out = min(max(int(round(len(self) * eval_fraction)), 1), len(self) - 1)
        return self.subset(np.sort(order[held_out:])), self.subset(np.sort(order[:held_out]))

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self), size):
            yield {k: v[start:start + size] for k, v in self.inputs.items()}


def feeds_per_batch(inputs: list[TensorInfo]) -> int | None:
    """Largest rows per call the model accepts: None when every input has a dynamic batch axis, else 1."""
    return None if all(t.dynamic_batch for t in inputs) else 1


def from_npz(path: Path, inputs: list[TensorInfo]) -> ModelData:
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    labels = arrays.pop("labels", None)
    return from_arrays(arrays, inputs, labels)


def from_arrays(arrays: dict[str, np.ndarray], inputs: list[TensorInfo], labels: np.ndarray | None) -> ModelData:
    missing = [t.name for t in inputs if t.name not in arrays]
    if missing:
        raise InvalidRecipe(f"the dataset has no array for input(s): {', '.join(missing)}")
    cast = {}
    for info in inputs:
        array = arrays[info.name]
        if not info.shape:
            cast[info.name] = array.astype(info.dtype, copy=False)
            continue
        if array.ndim != len(info.shape):
            raise InvalidRecipe(f"dataset array '{info.name}' has rank {array.ndim}, the input {len(info.shape)}")
        cast[info.name] = array.astype(info.dtype, copy=False)
    return ModelData(cast, labels, "dataset")


@dataclass(frozen=True)
class SyntheticPlan:
    """The size every dynamic non-batch dimension gets in generated inputs, found by running the model."""

    size: int
    tried: tuple[int, ...]

    def describe(self) -> str:
        return f"dynamic dimensions set to {self.size} (the first size the model ran at, of {list(self.tried)})"


_PLANS: dict[tuple[str, int, int], SyntheticPlan] = {}


def plan_synthetic(model: Path, seed: int = 0, runner: Any = None) -> SyntheticPlan:
    """The first size from SYNTHETIC_DYNAMIC_SIZES at which the model runs on generated inputs.

    Raises:
        DataRequired: an input cannot be generated (integers), or no size runs; the message says why.
    """
    stat = model.stat()
    key = (str(model), stat.st_mtime_ns, stat.st_size)
    if key in _PLANS:
        return _PLANS[key]
    inputs, _ = io_info(model)
    has_dynamic = any(d is None for info in inputs for d in info.shape[1:])
    sizes = SYNTHETIC_DYNAMIC_SIZES if has_dynamic else SYNTHETIC_DYNAMIC_SIZES[:1]
    runner = runner if runner is not None else session(model, quiet=True)  # the caller's open session, if any
    tried: list[int] = []
    error = ""
    started = time.monotonic()
    for size in sizes:
        probe = synthetic(inputs, seed=seed, samples=_PROBE_ROWS, size=size)
        rows = feeds_per_batch(inputs) or _PROBE_ROWS
        tried.append(size)
        try:
            runner.run(None, next(probe.batches(rows)))
        except Exception as exc:  # onnxruntime's own error types: this size does not fit the model
            error = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            if time.monotonic() - started > _PROBE_SECONDS:
                break
            continue
        plan = _PLANS[key] = SyntheticPlan(size, tuple(tried))
        return plan
    raise DataRequired(f"the model ran on no generated input (dynamic sizes tried: {', '.join(map(str, tried))}; "
                       f"last error: {error}); upload a dataset of valid inputs (POST /models/{{name}}/datasets)")


def synthetic_for(model: Path, seed: int, samples: int = SYNTHETIC_SAMPLES) -> ModelData:
    """Generated inputs at the sizes the model was found to run at."""
    return synthetic(io_info(model)[0], seed=seed, samples=samples, size=plan_synthetic(model, seed).size)


def synthetic(
    inputs: list[TensorInfo], seed: int, samples: int = SYNTHETIC_SAMPLES,
    ranges: dict[str, tuple[int, int]] | None = None, size: int = SYNTHETIC_DYNAMIC_SIZES[0],
) -> ModelData:
    """Floats from N(0, 1); booleans at random; integers only within a declared range; `size` for the dynamic
    dimensions after the batch (use `synthetic_for` to get one the model accepts)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for info in inputs:
        shape = (samples, *[size if d is None else d for d in info.shape[1:]]) if info.shape \
            else (samples,)
        if info.dtype.kind == "f":
            arrays[info.name] = rng.standard_normal(shape).astype(info.dtype)
        elif info.dtype.kind == "b":
            arrays[info.name] = rng.integers(0, 2, shape).astype(bool)
        elif info.dtype.kind in "iu" and ranges and info.name in ranges:
            low, high = ranges[info.name]
            arrays[info.name] = rng.integers(low, high, shape).astype(info.dtype)
        else:
            raise DataRequired(
                f"input '{info.name}' is {info.dtype}: random values would not be meaningful; "
                "upload a dataset for this model (POST /models/{name}/datasets)"
            )
    return ModelData(arrays, None, "synthetic")
