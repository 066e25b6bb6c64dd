"""Keras files vetted before Keras sees them, and converted to ONNX that computes what Keras computes."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from app.errors import InvalidContent, UnsupportedFormat
from app.formats import keras_convert, keras_file


def _vet(path: Path, tmp_path: Path) -> keras_file.KerasSummary:
    kind = keras_file.sniff(path, path.name, "the file")
    assert kind is not None
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return keras_file.vet(path, kind, "the file", scratch)


def _rewritten(source: Path, target: Path, edit: Callable[[dict[str, Any]], None],
               extra: dict[str, bytes] | None = None) -> Path:
    """A copy of a .keras zip with its config.json edited (and members added)."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for name in original.namelist():
            data = original.read(name)
            if name == "config.json":
                config = json.loads(data)
                edit(config)
                data = json.dumps(config).encode()
            copy.writestr(name, data)
        for name, data in (extra or {}).items():
            copy.writestr(name, data)
    return target


def _first_dense(config: dict[str, Any]) -> dict[str, Any]:
    return next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Dense")


def test_models_keras_saves_pass_and_are_summarised(keras_model_files: dict[str, Path], tmp_path: Path) -> None:
    cnn = _vet(keras_model_files["cnn.keras"], tmp_path)
    assert cnn.kind == keras_file.KERAS and cnn.model_class == "Sequential" and not cnn.recurrent
    assert cnn.layers["BatchNormalization"] == 1 and cnn.layers["Dropout"] == 1
    legacy = _vet(keras_model_files["cnn.h5"], tmp_path)
    assert legacy.kind == keras_file.KERAS_H5 and legacy.layers == cnn.layers
    assert _vet(keras_model_files["rnn.keras"], tmp_path).recurrent


@pytest.mark.parametrize(("edit", "refused"), [
    (lambda c: _first_dense(c).update(class_name="MyDense", registered_name="Custom>MyDense"), "custom object"),
    (lambda c: _first_dense(c).update(module="os", class_name="system"), "module 'os'"),
    (lambda c: _first_dense(c)["config"].update(activation="my_package>swish"), "not a built-in Keras activation"),
    (lambda c: _first_dense(c)["config"].update(
        kernel_initializer={"module": "builtins", "class_name": "eval", "config": {}, "registered_name": None}),
     "module 'builtins'"),
    (lambda c: _first_dense(c).update(class_name="TFSMLayer"), "SavedModel"),
    (lambda c: _first_dense(c).update(class_name="StringLookup"), "needs TensorFlow"),
    (lambda c: _first_dense(c).update(class_name="SimpleRNN"), "fixed sequence length"),
    (lambda c: c.update(class_name="Dense"), "not a Keras Sequential"),
])
def test_hostile_configs_are_refused_naming_the_field(keras_model_files: dict[str, Path], tmp_path: Path,
                                                      edit: Callable[[dict[str, Any]], None], refused: str) -> None:
    path = _rewritten(keras_model_files["two.keras"], tmp_path / "hostile.keras", edit)
    with pytest.raises(InvalidContent, match=refused):
        _vet(path, tmp_path)


def test_lambda_members_links_and_rnn_variants_are_refused(keras_model_files: dict[str, Path],
                                                           tmp_path: Path) -> None:
    with pytest.raises(InvalidContent, match=r"layer 'lambda' \(Lambda\) is refused: it holds Python code"):
        _vet(keras_model_files["lambda.keras"], tmp_path)
    escaping = _rewritten(keras_model_files["cnn.keras"], tmp_path / "escape.keras", lambda c: None,
                          extra={"../../etc/cron.d/x": b"* * * * * root true"})
    with pytest.raises(InvalidContent, match=r"member '../../etc/cron.d/x' is not part of a Keras model"):
        _vet(escaping, tmp_path)

    def relu_lstm(config: dict[str, Any]) -> None:
        lstm = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "LSTM")
        lstm["config"]["activation"] = "relu"

    with pytest.raises(InvalidContent, match="LSTM.*activation tanh and recurrent_activation sigmoid"):
        _vet(_rewritten(keras_model_files["rnn.keras"], tmp_path / "relu.keras", relu_lstm), tmp_path)
    linked = tmp_path / "linked.h5"
    linked.write_bytes(keras_model_files["cnn.h5"].read_bytes())
    with h5py.File(linked, "a") as handle:
        handle["model_weights"]["stolen"] = h5py.ExternalLink("/etc/passwd", "/")
    with pytest.raises(InvalidContent, match="a link to another file"):
        _vet(linked, tmp_path)
    weights_only = tmp_path / "weights.h5"
    with h5py.File(weights_only, "w") as handle:
        handle["dense/kernel"] = np.zeros((2, 2), np.float32)
    with pytest.raises(InvalidContent, match="weights only"):
        _vet(weights_only, tmp_path)


def test_tensorflow_formats_are_refused_with_what_to_do(tmp_path: Path) -> None:
    tflite = tmp_path / "model.tflite"
    tflite.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))
    with pytest.raises(UnsupportedFormat, match=r"TensorFlow Lite.*model.save\('model.keras'\)"):
        keras_file.sniff(tflite, "model.tflite", "the file")
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(b"\x08\x01")
    with pytest.raises(UnsupportedFormat, match="SavedModel"):
        keras_file.refuse_saved_model(folder, "the archive")


@pytest.mark.parametrize("name", ["cnn.keras", "cnn.h5", "two.keras", "rnn.keras"])
def test_conversion_matches_keras_at_unseen_batch_and_length(keras_model_files: dict[str, Path], tmp_path: Path,
                                                            name: str) -> None:
    output = tmp_path / "model.onnx"
    kind = keras_file.KERAS_H5 if name.endswith(".h5") else keras_file.KERAS
    result = keras_convert.convert(keras_model_files[name], kind, output, label=name, samples=None,
                                   progress=lambda _share, _stage: None)
    assert result.max_abs_error < 1e-4 and result.rows_checked > 0
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    stem = name.split(".")[0]
    with np.load(keras_model_files[f"{stem}.expected.npz"]) as expected:
        feeds = {i.name: expected[i.name] for i in session.get_inputs()}
        got = session.run(None, feeds)[0]
        np.testing.assert_allclose(got, expected["output"], atol=1e-5)
    if stem == "rnn":
        assert result.dynamic_axes == {"sequence": [0, 1]}  # 23 steps checked above; the export saw 7
        assert {n.op_type for n in onnx.load(str(output)).graph.node} >= {"LSTM", "GRU"}
