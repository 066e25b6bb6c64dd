"""PyTorch files to ONNX: the same numbers as PyTorch, dynamic axes, and files that must never run."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from app.errors import InvalidContent, UnsupportedFormat
from app.formats.torch_archive import TORCH_EXPORT, TORCHSCRIPT, sniff, vet_exported_program
from app.formats.torch_inputs import parse_input_shapes
from tests import torch_files
from tests.exports import silero_vad_script
from tests.helpers import CNN_SAMPLES, TRANSFORMER_SAMPLES
from tests.torch_files import TorchProcess


@pytest.fixture
def files(torch_model_files: dict[str, Path]) -> dict[str, Path]:
    return torch_model_files


def _samples(path: Path, rows: int) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {k: archive[k][:rows] for k in archive.files if k != "labels"}


@pytest.fixture
def torch(torch_process: TorchProcess) -> TorchProcess:
    return torch_process


def _convert(torch: TorchProcess, source: Path, tmp_path: Path, **kwargs: object) -> tuple[Path, object]:
    """The worker's conversion, run in the tests' PyTorch child process."""
    output = tmp_path / "out.onnx"
    return output, torch.call(torch_files.convert_file, source, output, **kwargs)


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(ort.InferenceSession(str(path)).run(None, feeds)[0])


@pytest.mark.parametrize("name", ["cnn.pt2", "cnn.pt"])
def test_cnn_files_give_pytorch_predictions(torch: TorchProcess, files: dict[str, Path], tmp_path: Path,
                                            name: str) -> None:
    feeds = {"x": _samples(CNN_SAMPLES, 64)["input"]}  # the PyTorch module calls its input x
    onnx_path, result = _convert(torch, files[name], tmp_path, samples=feeds)
    got = _run(onnx_path, feeds)
    expected = torch.call(torch_files.reference, files[name], feeds)
    assert got.shape == (64, 10)
    assert np.max(np.abs(got - expected)) < 1e-4
    assert result.max_abs_error < 1e-4 and result.rows_checked >= 2  # type: ignore[attr-defined]
    assert result.dynamic_axes == {"x": [0]}  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["transformer.pt2", "transformer.pt"])
def test_transformer_files_keep_batch_and_sequence_dynamic(torch: TorchProcess, files: dict[str, Path],
                                                           tmp_path: Path, name: str) -> None:
    shapes = parse_input_shapes(torch_files.TRANSFORMER_INPUT)
    onnx_path, result = _convert(torch, files[name], tmp_path, input_shapes=shapes)
    assert result.dynamic_axes == {"input_ids": [0, 1], "attention_mask": [0, 1]}  # type: ignore[attr-defined]
    data = _samples(TRANSFORMER_SAMPLES, 5)  # 5 rows of a length the export never saw
    got = _run(onnx_path, data)
    expected = torch.call(torch_files.reference, files[name], data)
    assert got.shape == (5, 16) and np.max(np.abs(got - expected)) < 1e-4


def test_a_static_export_keeps_its_batch_size_and_says_so(torch: TorchProcess, files: dict[str, Path],
                                                          tmp_path: Path) -> None:
    # Exported without dynamic_shapes, the program holds view(2, 512): it cannot be made dynamic afterwards.
    onnx_path, result = _convert(torch, files["cnn_static.pt2"], tmp_path)  # example inputs from the archive itself
    feeds = {"x": _samples(CNN_SAMPLES, 2)["input"]}
    got = _run(onnx_path, feeds)
    assert np.max(np.abs(got - torch.call(torch_files.reference, files["cnn_static.pt2"], feeds))) < 1e-4
    assert result.dynamic_axes == {}  # type: ignore[attr-defined]
    assert any("batch size is fixed at 2" in w and "dynamic_shapes" in w
               for w in result.warnings)  # type: ignore[attr-defined]


def test_torchscript_without_example_inputs_is_refused_with_what_to_send(torch: TorchProcess,
                                                                         files: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    with pytest.raises(InvalidContent, match="samples.*input_shapes"):
        _convert(torch, files["cnn.pt"], tmp_path)


def test_samples_that_do_not_name_the_inputs_are_refused(torch: TorchProcess, files: dict[str, Path],
                                                         tmp_path: Path) -> None:
    with pytest.raises(InvalidContent, match="no array for input.*x"):
        _convert(torch, files["cnn.pt"], tmp_path, samples={"pixels": np.zeros((4, 1, 8, 8), np.float32)})


def test_outputs_keep_the_names_the_model_gives_them(torch: TorchProcess, tmp_path: Path) -> None:
    heads = torch.call(torch_files.save_two_heads, tmp_path)
    feeds = {"x": np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)}
    onnx_path, _ = _convert(torch, heads["dict.pt2"], tmp_path, samples=feeds)
    session = ort.InferenceSession(str(onnx_path))
    assert [o.name for o in session.get_outputs()] == ["logits", "probs"]
    expected = torch.call(torch_files.reference_outputs, heads["dict.pt2"], feeds)
    for name, got in zip(["logits", "probs"], session.run(None, feeds), strict=True):
        assert np.max(np.abs(got - expected[name])) < 1e-5
    onnx_path, _ = _convert(torch, heads["tuple.pt"], tmp_path, samples=feeds)
    assert [o.name for o in ort.InferenceSession(str(onnx_path)).get_outputs()] == ["output_0", "output_1"]


def test_python_scalar_arguments_are_fixed_at_the_given_value_and_said(torch: TorchProcess,
                                                                        tmp_path: Path) -> None:
    path = tmp_path / "sample_rate.pt"
    torch.call(torch_files.save_sample_rate_script, path)
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    # from 0-d arrays among the samples
    onnx_path, result = _convert(torch, path, tmp_path, samples={"x": x, "sr": np.array(16000), "gain": np.array(2.0)})
    session = ort.InferenceSession(str(onnx_path))
    assert [i.name for i in session.get_inputs()] == ["x"]
    expected = torch.call(torch_files.reference_with_scalars, path, x, 16000, 2.0)
    assert np.max(np.abs(session.run(None, {"x": x})[0] - expected)) < 1e-5
    assert any("sr is fixed at 16000" in w for w in result.warnings)  # type: ignore[attr-defined]
    # from input_shapes, the other branch of the model
    shapes = parse_input_shapes({"x": ["batch", 8], "sr": {"value": 8000}, "gain": {"value": 0.5}})
    onnx_path, result = _convert(torch, path, tmp_path, input_shapes=shapes)
    expected = torch.call(torch_files.reference_with_scalars, path, x, 8000, 0.5)
    assert np.max(np.abs(_run(onnx_path, {"x": x}) - expected)) < 1e-5
    assert result.dynamic_axes == {"x": [0]}  # type: ignore[attr-defined]
    with pytest.raises(InvalidContent, match=r"forward\(\) takes sr: int.*\{\"sr\": \{\"value\"") as error:
        _convert(torch, path, tmp_path, input_shapes=parse_input_shapes({"x": ["batch", 8]}))
    assert error.value.code == "example_inputs_required"


def test_a_real_streaming_model_gets_past_its_sample_rate_and_is_refused_for_its_state(torch: TorchProcess,
                                                                                      tmp_path: Path) -> None:
    # Silero VAD's TorchScript release: forward(x, sr: int) remembers its LSTM state and context between calls.
    source = silero_vad_script()
    if source is None:
        pytest.skip("the silero-vad wheel is not installed")
    samples = {"x": np.zeros((1, 512), np.float32), "sr": np.array(16000)}
    with pytest.raises(InvalidContent, match=r"keeps state between calls.*self\._state.*state as an input") as error:
        _convert(torch, source, tmp_path, samples=samples)
    assert error.value.code == "stateful_model"


def test_state_kept_only_while_training_does_not_count(torch: TorchProcess, tmp_path: Path) -> None:
    path = tmp_path / "counter.pt"
    torch.call(torch_files.save_training_counter_script, path)
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)}
    onnx_path, _ = _convert(torch, path, tmp_path, samples=feeds)
    assert np.max(np.abs(_run(onnx_path, feeds) - torch.call(torch_files.reference, path, feeds))) < 1e-4


def test_a_scalar_value_in_input_shapes_must_be_a_number() -> None:
    with pytest.raises(InvalidContent, match="'sr' must be a number"):
        parse_input_shapes({"x": [1, 8], "sr": {"value": "16k"}})


def test_torchscript_returning_a_dict_is_refused_with_what_to_do(torch: TorchProcess, tmp_path: Path) -> None:
    heads = torch.call(torch_files.save_two_heads, tmp_path)
    with pytest.raises(InvalidContent, match=r"returns a dict.*return a tuple.*\.pt2") as error:
        _convert(torch, heads["dict.pt"], tmp_path, samples={"x": np.zeros((3, 4), np.float32)})
    assert error.value.code == "unsupported_output"


@pytest.mark.parametrize("name", ["state_dict.pt", "module.pt"])
def test_plain_pickles_are_refused_by_their_bytes(files: dict[str, Path], name: str) -> None:
    with pytest.raises(UnsupportedFormat, match="pickle") as error:
        sniff(files[name], name, "the file")
    assert error.value.code == "pickle_refused" and "torch.export.save" in str(error.value)


def test_the_two_formats_are_recognised_whatever_their_names(files: dict[str, Path]) -> None:
    assert sniff(files["cnn.pt2"], "model.bin", "f") .kind == TORCH_EXPORT  # type: ignore[union-attr]
    assert sniff(files["cnn.pt"], "model", "f").kind == TORCHSCRIPT  # type: ignore[union-attr]


def _rewrite(source: Path, target: Path, edit: object) -> None:
    """Copy an archive, passing its program JSON through `edit`."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = old.read(info)
            if info.filename.endswith("models/model.json") or info.filename.endswith("model_weights_config.json"):
                data = json.dumps(edit(info.filename, json.loads(data))).encode()  # type: ignore[operator]
            new.writestr(info, data)


def _first_node(document: dict[str, Any]) -> dict[str, Any]:
    node: dict[str, Any] = document["graph_module"]["graph"]["nodes"][0]
    return node


@pytest.mark.parametrize("attack", ["target", "expression", "pickled_weight"])
def test_archives_that_would_run_code_are_refused_before_torch_reads_them(
        torch: TorchProcess, files: dict[str, Path], tmp_path: Path, attack: str) -> None:
    marker = tmp_path / "pwned"

    def edit(name: str, document: dict) -> dict:  # type: ignore[type-arg]
        if attack == "target" and name.endswith("model.json"):
            _first_node(document)["target"] = "torch.os.system"
        if attack == "expression" and name.endswith("model.json"):
            document["range_constraints"] = {f"__import__('pathlib').Path('{marker}').touch()": {
                "min_val": 0, "max_val": 8}}
        if attack == "pickled_weight" and name.endswith("weights_config.json"):
            next(iter(document["config"].values()))["use_pickle"] = True
        return document

    evil = tmp_path / "evil.pt2"
    _rewrite(files["cnn.pt2"], evil, edit)
    archive = sniff(evil, "evil.pt2", "the file")
    assert archive is not None
    with pytest.raises((InvalidContent, UnsupportedFormat)):
        vet_exported_program(evil, archive.root, "the file")
    with pytest.raises((InvalidContent, UnsupportedFormat)):
        _convert(torch, evil, tmp_path)
    assert not marker.exists()


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_torchscript_with_a_planted_pickle_fails_to_load_and_runs_nothing(torch: TorchProcess,
                                                                          files: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(files["cnn.pt"]) as old, zipfile.ZipFile(evil, "w") as new:
        for info in old.infolist():
            data = pickle.dumps(_Planted(marker)) if info.filename.endswith("/data.pkl") else old.read(info)
            new.writestr(info, data)
    with pytest.raises(InvalidContent, match="could not be loaded as TorchScript"):
        _convert(torch, evil, tmp_path, samples={"x": np.zeros((4, 1, 8, 8), np.float32)})
    assert not marker.exists()


def test_torchscript_that_reads_files_is_refused(torch: TorchProcess, tmp_path: Path) -> None:
    path = tmp_path / "reader.pt"
    torch.call(torch_files.save_file_reader, path)
    with pytest.raises(InvalidContent, match="aten::from_file"):
        _convert(torch, path, tmp_path, samples={"x": np.zeros((2, 1), np.float32)})


def test_a_trace_that_baked_its_batch_size_is_served_at_that_size_with_a_warning(torch: TorchProcess,
                                                                                 tmp_path: Path) -> None:
    path = tmp_path / "baked.pt"
    torch.call(torch_files.save_baked_trace, path)
    samples = {"x": np.random.default_rng(0).standard_normal((6, 2, 4)).astype(np.float32)}
    onnx_path, result = _convert(torch, path, tmp_path, samples=samples)
    assert result.dynamic_axes == {}  # type: ignore[attr-defined]
    assert any("batch size is fixed at 2" in w for w in result.warnings)  # type: ignore[attr-defined]
    session = ort.InferenceSession(str(onnx_path))
    assert session.get_inputs()[0].shape == [2, 2, 4]
    feeds = {"x": samples["x"][:2]}
    assert np.max(np.abs(session.run(None, feeds)[0] - torch.call(torch_files.reference, path, feeds))) < 1e-5
