"""Datasets as `.npz` files: one array per model input plus optional `labels`, checked against the model."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.errors import InvalidContent, TooLarge
from app.runtime.datatypes import TensorSpec

LABELS = "labels"
# Largest total of uncompressed arrays accepted, whatever the compressed file size (zip bombs).
MAX_UNCOMPRESSED_BYTES = 4 * 1024**3


@dataclass
class Dataset:
    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None

    @property
    def samples(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])


def read_arrays(path: Path, *, display_name: str) -> dict[str, np.ndarray]:
    """Every array of an .npz, bounded in size; never unpickles (object arrays are refused)."""
    _check_archive(path, display_name)
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InvalidContent(f"{display_name} is not a readable .npz file ({exc})") from None
    arrays: dict[str, np.ndarray] = {}
    with archive:
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except ValueError:
                raise InvalidContent(
                    f"array '{key}' in {display_name} holds Python objects, which are never unpickled"
                ) from None
            except Exception as exc:
                raise InvalidContent(f"array '{key}' in {display_name} cannot be read ({exc})") from None
    return arrays


def load_dataset(path: Path, inputs: list[TensorSpec], *, display_name: str) -> Dataset:
    """Load and check every array against the model's inputs."""
    return check_dataset(read_arrays(path, display_name=display_name), inputs, display_name=display_name)


def check_dataset(found: dict[str, np.ndarray], inputs: list[TensorSpec], *, display_name: str) -> Dataset:
    """Check arrays already read (see read_arrays) against the model's inputs."""
    specs = {spec.name: spec for spec in inputs}
    arrays: dict[str, np.ndarray] = {}
    labels: np.ndarray | None = None
    for key, array in found.items():
        if key == LABELS:
            labels = _check_labels(array, display_name)
        elif key in specs:
            arrays[key] = _check_input(array, specs[key], display_name)
        else:
            raise InvalidContent(
                f"array '{key}' in {display_name} matches no model input (inputs: {', '.join(specs)}; "
                f"optional '{LABELS}')"
            )
    missing = [name for name in specs if name not in arrays]
    if missing:
        raise InvalidContent(f"{display_name} has no array for input(s): {', '.join(missing)}")
    counts = {name: array.shape[0] for name, array in arrays.items()}
    if labels is not None:
        counts[LABELS] = labels.shape[0]
    if len(set(counts.values())) != 1:
        detail = ", ".join(f"'{k}': {v}" for k, v in counts.items())
        raise InvalidContent(f"arrays in {display_name} must have the same number of samples; got {detail}")
    if next(iter(counts.values())) == 0:
        raise InvalidContent(f"{display_name} holds no samples")
    return Dataset(arrays=arrays, labels=labels)


def batch_of(dataset: Dataset, spec: TensorSpec, rows: int) -> np.ndarray:
    """The first rows of an input, shaped and typed for the model (one sample for a fixed batch of 1)."""
    array = dataset.arrays[spec.name]
    if not spec.shape:
        return np.asarray(array[0], dtype=spec.numpy_dtype)  # a scalar input takes one sample
    if spec.shape[0] == 1:
        rows = 1
    return np.ascontiguousarray(array[:rows], dtype=spec.numpy_dtype if spec.datatype != "BYTES" else None)


def _check_archive(path: Path, display_name: str) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            total = sum(info.file_size for info in archive.infolist())
    except zipfile.BadZipFile:
        raise InvalidContent(f"{display_name} is not an .npz (zip) archive") from None
    if total > MAX_UNCOMPRESSED_BYTES:
        raise TooLarge(
            f"{display_name} unpacks to {total} bytes; the limit is {MAX_UNCOMPRESSED_BYTES} bytes"
        )


def _check_input(array: np.ndarray, spec: TensorSpec, display_name: str) -> np.ndarray:
    where = f"array '{spec.name}' in {display_name}"
    want_kind = spec.numpy_dtype.kind
    kind = array.dtype.kind
    compatible = kind == want_kind or (want_kind == "O" and kind in "US") or (want_kind in "iu" and kind in "iu")
    if not compatible:
        raise InvalidContent(f"{where} has dtype {array.dtype}, but the input is {spec.datatype}")
    if not spec.shape:
        if array.ndim != 1:
            raise InvalidContent(f"{where} must be 1-D (one scalar per sample), got shape {list(array.shape)}")
        return array
    if array.ndim != len(spec.shape):
        raise InvalidContent(
            f"{where} has rank {array.ndim} (shape {list(array.shape)}), but the input has rank "
            f"{len(spec.shape)} (shape {list(spec.shape)}); the first axis counts samples"
        )
    if spec.shape[0] not in (-1, 1):
        raise InvalidContent(
            f"input '{spec.name}' has a fixed first dimension of {spec.shape[0]}, so samples cannot be "
            "stacked along it; datasets need models with a batch axis"
        )
    for axis, (got, want) in enumerate(zip(array.shape[1:], spec.shape[1:], strict=True), start=1):
        if want >= 0 and got != want:
            raise InvalidContent(
                f"{where} has size {got} on axis {axis}, but the input expects {want} (shape {list(spec.shape)})"
            )
    return array


def _check_labels(array: np.ndarray, display_name: str) -> np.ndarray:
    if array.ndim == 0 or array.dtype.kind not in "iuf":
        raise InvalidContent(
            f"'labels' in {display_name} must be an array of class ids or numeric targets with one row per sample"
        )
    return array
