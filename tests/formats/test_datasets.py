from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.errors import InvalidContent
from app.formats.datasets import batch_of, load_dataset
from app.runtime.datatypes import TensorSpec
from tests.helpers import npz_bytes

IMAGE = TensorSpec("input", "FP32", (-1, 1, 8, 8))


def _write(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "d.npz"
    path.write_bytes(content)
    return path


def test_a_matching_dataset_loads_with_labels(tmp_path: Path) -> None:
    path = _write(tmp_path, npz_bytes(input=np.zeros((5, 1, 8, 8)), labels=np.arange(5)))
    dataset = load_dataset(path, [IMAGE], display_name="d")
    assert dataset.samples == 5 and dataset.labels is not None
    batch = batch_of(dataset, IMAGE, 3)
    assert batch.shape == (3, 1, 8, 8) and batch.dtype == np.float32  # float64 in the file, FP32 for the model


def test_fixed_batch_of_one_feeds_one_sample(tmp_path: Path) -> None:
    spec = TensorSpec("x", "FP32", (1, 4))
    dataset = load_dataset(_write(tmp_path, npz_bytes(x=np.ones((7, 4)))), [spec], display_name="d")
    assert batch_of(dataset, spec, 8).shape == (1, 4)


def test_scalar_inputs_take_one_value_per_sample(tmp_path: Path) -> None:
    spec = TensorSpec("n", "INT64", ())
    assert load_dataset(_write(tmp_path, npz_bytes(n=np.arange(3))), [spec], display_name="d").samples == 3
    with pytest.raises(InvalidContent, match="1-D"):
        load_dataset(_write(tmp_path, npz_bytes(n=np.zeros((3, 1), np.int64))), [spec], display_name="d")


def test_strings_for_bytes_inputs_and_refusals(tmp_path: Path) -> None:
    text = TensorSpec("t", "BYTES", (-1,))
    assert load_dataset(_write(tmp_path, npz_bytes(t=np.array(["a", "b"]))), [text], display_name="d").samples == 2
    with pytest.raises(InvalidContent, match="fixed first dimension"):
        load_dataset(_write(tmp_path, npz_bytes(x=np.zeros((2, 4)))), [TensorSpec("x", "FP32", (2, 4))],
                     display_name="d")
    with pytest.raises(InvalidContent, match="holds no samples"):
        load_dataset(_write(tmp_path, npz_bytes(input=np.zeros((0, 1, 8, 8)))), [IMAGE], display_name="d")
    with pytest.raises(InvalidContent, match="not an .npz"):
        path = tmp_path / "a.npy"
        np.save(path, np.zeros(3))
        load_dataset(path, [IMAGE], display_name="d")
