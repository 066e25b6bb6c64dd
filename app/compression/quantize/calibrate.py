"""Calibration for static quantization: samples, a data reader, and activation ranges computed once.

We drive onnxruntime's calibraters ourselves rather than through `quantize_static`, for three reasons:
ranges are computed once and reused by every attempt (via the calibration cache), tensors holding inf/NaN
(attention masks) are left out (the histogram calibraters crash on them), and the samples are fed in chunks,
so memory stays bounded (the histogram calibraters keep every intermediate output of a `collect_data` call).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
from onnxruntime.quantization.calibrate import (
    EntropyCalibrater,
    MinMaxCalibrater,
    PercentileCalibrater,
    save_tensors_data,
)

from app.compression import data as model_data
from app.compression import graph
from app.compression.data import ModelData

CALIBRATION_SAMPLES = 256
_BATCH = 16
_BATCHES_PER_CHUNK = 4
METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
# Magnitudes no int8 range can hold usefully: attention masks filled with float32's minimum (-3.4e38), as the
# TorchScript exporter writes them, break the histogram calibraters as inf does.
UNREPRESENTABLE = 1e20


def representable(values: np.ndarray) -> bool:
    """Finite, and small enough for an 8-bit range to mean something."""
    if values.size == 0:
        return True
    as_float = np.asarray(values, dtype=np.float64)
    return bool(np.all(np.isfinite(as_float)) and float(np.max(np.abs(as_float))) <= UNREPRESENTABLE)


class FeedReader(CalibrationDataReader):  # type: ignore[misc]
    """Hands prepared feeds to a calibrater; `tick` runs between batches (progress, cancellation)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], tick: Callable[[], None]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)
        self._tick = tick

    def get_next(self) -> dict[str, np.ndarray] | None:
        self._tick()
        return next(self._feeds, None)


def calibration_feeds(model: Path, data: ModelData) -> list[dict[str, np.ndarray]]:
    """Batches of equal size: the histogram calibraters stack batches and fail on a shorter last one."""
    inputs, _ = graph.io_info(model)
    batch = model_data.feeds_per_batch(inputs) or min(_BATCH, len(data))
    usable = data.take(len(data) - len(data) % batch)
    return list(usable.batches(batch))


def _calibrater_class(method: str) -> Any:
    base: Any = {"minmax": MinMaxCalibrater, "entropy": EntropyCalibrater, "percentile": PercentileCalibrater}[method]

    class Skipping(base):  # type: ignore[misc]
        """Leaves out the tensors named in `skip`."""

        skip: frozenset[str] = frozenset()

        def select_tensors_to_calibrate(self, model: onnx.ModelProto) -> tuple[set[str], dict[str, Any]]:
            tensors, infos = super().select_tensors_to_calibrate(model)
            return set(tensors) - self.skip, infos

    return Skipping


def calibrate(model: Path, op_types: list[str], method: str, feeds: list[dict[str, np.ndarray]],
              skip: set[str], cache: Path, workdir: Path, tick: Callable[[float], None]) -> Path:
    """Compute activation ranges for the tensors around `op_types` nodes and write them to `cache`."""
    cls = _calibrater_class(method)
    cls.skip = frozenset(skip)
    calibrater = cls(str(model), op_types, augmented_model_path=str(workdir / "augmented.onnx"))
    calibrater.augment_graph()
    calibrater.create_inference_session()
    for start in range(0, len(feeds), _BATCHES_PER_CHUNK):
        chunk = feeds[start:start + _BATCHES_PER_CHUNK]
        calibrater.collect_data(FeedReader(chunk, lambda: None))
        tick((start + len(chunk)) / len(feeds))
    save_tensors_data(calibrater.compute_data(), cache)
    return cache


def nonfinite_tensors(model: onnx.ModelProto, names: set[str], feeds: dict[str, np.ndarray],
                      workdir: Path) -> set[str]:
    """Which of `names` (float activations) hold inf, NaN or mask-like extremes on one calibration batch."""
    typed = {v.name: v for v in [*model.graph.value_info, *model.graph.output]}
    wanted = sorted(n for n in names if n in typed and typed[n].type.tensor_type.elem_type in _FLOATS)
    if not wanted:
        return set()
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(typed[n] for n in wanted if n not in present)
    path = graph.save(probe, workdir / "finite-probe.onnx")
    values = graph.session(path).run(wanted, feeds)
    path.unlink()
    return {name for name, value in zip(wanted, values, strict=True) if not representable(value)}
