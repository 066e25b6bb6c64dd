from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from app.compression import Budget, measure, synthetic
from app.compression.data import ModelData
from app.compression.graph import io_info
from tests.helpers import CNN, MLP


def _noisy_copy(source: Path, target: Path, scale: float) -> Path:
    model = onnx.load(str(source))
    rng = np.random.default_rng(0)
    for index, tensor in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.ndim >= 2:
            noisy = array + rng.normal(0, scale * float(np.std(array)), array.shape).astype(np.float32)
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(noisy, tensor.name))
    onnx.save(model, str(target))
    return target


def test_a_model_against_itself_is_perfectly_faithful(mlp_data: ModelData) -> None:
    report = measure(MLP, MLP, mlp_data.take(100))
    fidelity = report["fidelity"]
    assert fidelity["agreement"] == 1.0 and fidelity["cosine_mean"] == 1.0 and fidelity["max_abs_error"] == 0.0
    assert fidelity["accuracy"] == fidelity["original_accuracy"] > 0.9
    assert fidelity["samples"] == 100 and fidelity["data"] == "dataset"
    assert report["size_ratio"] == 1.0 and report["within_budget"] is True
    assert report["latency_ms"]["batch_n"]["batch"] == 32
    assert report["parameters"] == report["original"]["parameters"] > 0
    assert report["latency_ms"]["batch_1"]["p50"] > 0 and report["speedup"]["batch_1"] > 0


def test_noise_lowers_fidelity_and_breaks_a_tight_budget(tmp_path: Path, cnn_data: ModelData) -> None:
    noisy = _noisy_copy(CNN, tmp_path / "noisy.onnx", scale=0.6)
    report = measure(CNN, noisy, cnn_data, budget=Budget(metric="agreement", max_drop=0.001))
    fidelity = report["fidelity"]
    assert fidelity["agreement"] < 1.0 and fidelity["cosine_mean"] < 1.0 and fidelity["relative_l2"] > 0
    assert fidelity["cosine_min"] <= fidelity["cosine_mean"]
    assert report["within_budget"] is False
    loose = measure(CNN, noisy, cnn_data, budget=Budget(metric="cosine", max_drop=0.9))
    assert loose["within_budget"] is True


def test_synthetic_data_is_reported_as_such() -> None:
    inputs, _ = io_info(MLP)
    data = synthetic(inputs, seed=1, samples=40)
    report = measure(MLP, MLP, data)
    assert report["fidelity"]["data"] == "synthetic" and report["fidelity"]["accuracy"] is None
