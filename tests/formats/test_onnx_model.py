from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.errors import InvalidContent
from app.formats.onnx_model import _leaves_folder, inspect_onnx, smoke_test
from tests.helpers import TRANSFORMER, TRANSFORMER_SAMPLES, external_data_model, fails_on_zeros_model

PROVIDERS = ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("location", "leaves"),
    [("weights.bin", False), ("sub/w.bin", False), ("./w.bin", False), ("a/../w.bin", False),
     ("../w.bin", True), ("a/../../w.bin", True), ("/etc/passwd", True), ("..\\..\\w", True),
     ("\\\\server\\share", True), ("", True), ("w\x00.bin", True)],
)
def test_external_data_locations(location: str, leaves: bool) -> None:
    assert _leaves_folder(location) is leaves


def test_transformer_inputs_are_int64_with_dynamic_batch_and_sequence() -> None:
    info, session = inspect_onnx(TRANSFORMER, display_name="t", providers=PROVIDERS)
    assert [(s.name, s.datatype, s.shape) for s in info.inputs] == [
        ("input_ids", "INT64", (-1, -1)), ("attention_mask", "INT64", (-1, -1))]
    assert info.inputs[0].dim_names == ("batch", "sequence")
    assert [(s.name, s.shape) for s in info.outputs] == [("embedding", (-1, 16))]
    samples = dict(np.load(TRANSFORMER_SAMPLES))
    assert smoke_test(session, info.inputs, samples) is None
    assert smoke_test(session, info.inputs, None) is None


def test_inspection_refuses_what_would_escape(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(external_data_model("../../etc/passwd"))
    with pytest.raises(InvalidContent, match="outside the upload"):
        inspect_onnx(path, display_name="m", providers=PROVIDERS)


def test_zero_run_failure_is_a_warning_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(fails_on_zeros_model())
    info, session = inspect_onnx(path, display_name="m", providers=PROVIDERS)
    assert info.inputs[0].shape == ()
    warning = smoke_test(session, info.inputs, None)
    assert warning is not None and "all-zero" in warning
    with pytest.raises(InvalidContent, match="uploaded samples"):
        smoke_test(session, info.inputs, {"step": np.array(0, np.int64)})
