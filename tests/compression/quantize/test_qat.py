"""Quantization-aware training: fake quantization in the bridge computes what onnxruntime's QDQ graph computes, and
the trained model keeps the calibrated model's structure, scales and int8 storage."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import numpy_helper

from app.compression import graph, quantize
from app.compression.config import QatConfig, QuantizeStep, parse_recipe
from app.compression.context import StepContext
from app.compression.data import ModelData
from app.compression.distill.bridge.module import OnnxModule
from app.compression.errors import DataRequired, InvalidRecipe
from app.compression.preflight import check, profile
from app.compression.quantize.qat import _fake_quantized
from tests.helpers import CNN, MLP

MakeCtx = Callable[..., StepContext]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory, cnn_data: ModelData) -> Path:
    from app.compression.context import standalone_context

    folder = tmp_path_factory.mktemp("qdq")
    output = folder / "static.onnx"
    quantize.run(CNN, output, QuantizeStep(mode="static"), standalone_context(CNN, folder, cnn_data.take(64)))
    return output


def test_fake_quantization_in_the_bridge_matches_onnxruntime(calibrated: Path, cnn_data: ModelData) -> None:
    model = graph.load(calibrated)
    weights = _fake_quantized(model)
    assert weights and all(n.op_type != "QuantizeLinear" or n.input[0].endswith(".qat_float")
                           or n.input[0] not in {t.name for t in model.graph.initializer} for n in model.graph.node)
    feeds = next(cnn_data.batches(32))
    module = OnnxModule(model)
    assert set(module.onnx_parameters()) >= {w.shadow for w in weights}  # the float weights are what trains
    with torch.no_grad():
        mine = module(feeds)[0].numpy()
    theirs = graph.session(model.SerializeToString()).run(None, feeds)[0]
    plain = graph.session(calibrated).run(None, feeds)[0]
    np.testing.assert_allclose(theirs, plain, atol=1e-5)  # fake-quantized weights are the same int8 values
    assert np.abs(mine - theirs).max() < 0.05 * np.abs(theirs).max()
    assert (mine.argmax(1) == theirs.argmax(1)).mean() == 1.0


def test_straight_through_gradients_reach_the_float_weights(calibrated: Path, cnn_data: ModelData) -> None:
    model = graph.load(calibrated)
    weights = _fake_quantized(model)
    module = OnnxModule(model)
    module(next(cnn_data.batches(8)))[0].sum().backward()
    gradient = module.parameter(weights[0].shadow).grad
    assert gradient is not None and float(gradient.abs().sum()) > 0


def test_qat_keeps_the_calibrated_structure_and_int8_weights(tmp_path: Path, make_ctx: MakeCtx,
                                                            mlp_data: ModelData) -> None:
    train = ModelData(mlp_data.inputs, None, "dataset")
    plain, with_qat = tmp_path / "static.onnx", tmp_path / "qat.onnx"
    quantize.run(MLP, plain, QuantizeStep(mode="static"), make_ctx(MLP, train))
    step = QuantizeStep(mode="static", qat=QatConfig(epochs=3, lr=1e-4))
    notes = quantize.run(MLP, with_qat, step, make_ctx(MLP, train))
    qat = notes["qat"]
    assert qat["epochs_run"] == 3 and qat["weights_trained"] >= 3
    assert 0 < qat["weights_changed_share"] < 0.5  # a nudge, not a new model
    assert min(qat["validation_loss"]) <= qat["validation_loss_before"]
    assert qat["fidelity_after"]["agreement"] >= qat["fidelity_before"]["agreement"] - 0.02
    before, after = graph.load(plain), graph.load(with_qat)
    assert graph.op_counts(after) == graph.op_counts(before)
    types = {t.name: t.data_type for t in before.graph.initializer}
    assert {t.name: t.data_type for t in after.graph.initializer} == types
    assert any(numpy_helper.to_array(t).dtype == np.int8 for t in after.graph.initializer)
    assert graph.model_bytes(with_qat) <= graph.model_bytes(plain) * 1.01


def test_qat_is_refused_without_data_or_with_another_mode(tmp_path: Path, make_ctx: MakeCtx) -> None:
    with pytest.raises(InvalidRecipe, match="qat trains a static INT8 model"):
        parse_recipe({"steps": [{"op": "quantize", "mode": "dynamic", "qat": {}}]})
    recipe = parse_recipe({"steps": [{"op": "quantize", "mode": "static", "qat": {"epochs": 1}}]})
    assert "upload a dataset" in check(profile(MLP), recipe, has_dataset=False)[0]
    assert check(profile(MLP), recipe, has_dataset=True) == []
    with pytest.raises(DataRequired, match="real inputs"):
        quantize.run(MLP, tmp_path / "q.onnx", QuantizeStep(mode="static", qat=QatConfig(epochs=1)), make_ctx(MLP))
