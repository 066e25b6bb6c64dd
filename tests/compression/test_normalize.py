"""The normalize step on exports as their exporters wrote them, and generated inputs at sizes the model takes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.compression import data as model_data
from app.compression import graph, preflight
from app.compression.errors import DataRequired
from app.compression.normalize import normalize
from tests.exports import exporter_models, paddle_models, text_images


def _paddle(kind: str) -> Path:
    found = paddle_models().get(kind)
    if found is None:
        pytest.skip("rapidocr-onnxruntime (PaddleOCR's models) is not installed")
    return found


def test_paddle_constant_weights_become_initializers_and_the_opset_rises(tmp_path: Path) -> None:
    source = _paddle("cls")
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    original = graph.load(source)
    assert not original.graph.initializer and graph.default_opset(original) == 11  # as Paddle2ONNX wrote it

    images = text_images(4, 48, 192)
    notes = normalize(source, tmp_path / "n.onnx", model_data.from_arrays({"x": images}, graph.io_info(source)[0],
                                                                         None))

    result = graph.load(tmp_path / "n.onnx")
    assert notes["constants_lifted"] > 100 and notes["opset_upgraded"] == {
        "from": 11, "to": 13, "why": "per-channel quantization needs opset 13"}
    assert graph.default_opset(result) == 13 and len(result.graph.initializer) > 50
    assert not [n for n in result.graph.node if n.op_type == "Constant"]
    assert "outputs equal the original's" in notes["checked"]
    conv_weights = {n.input[1] for n in result.graph.node if n.op_type == "Conv"}
    assert conv_weights <= {t.name for t in result.graph.initializer}
    np.testing.assert_allclose(graph.session(tmp_path / "n.onnx").run(None, {"x": images})[0],
                               graph.session(source).run(None, {"x": images})[0], atol=1e-5)
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before  # the upload itself is never touched
    # -1 is how Paddle2ONNX writes a dynamic batch: read as dynamic, and kept as the file declares it
    assert graph.io_info(source)[0][0].shape == (None, 3, None, None)


def test_torchscript_identity_shared_weights_are_owned_again(tmp_path: Path) -> None:
    source = exporter_models() / "vit.torchscript.onnx"
    identities = [n for n in graph.load(source).graph.node if n.op_type == "Identity"]
    assert identities  # the TorchScript exporter shares equal (zero) biases through Identity nodes

    notes = normalize(source, tmp_path / "n.onnx", None)

    result = graph.load(tmp_path / "n.onnx")
    assert notes["identities_resolved"] == len(identities)
    assert not [n for n in result.graph.node if n.op_type == "Identity"]
    readers: dict[str, int] = {}
    for node in result.graph.node:
        if node.op_type == "Add":
            for name in node.input:
                readers[name] = readers.get(name, 0) + 1
    biases = {t.name for t in result.graph.initializer if len(t.dims) == 1}
    assert all(readers.get(b, 0) <= 1 for b in biases)


def test_undeclared_contrib_domains_are_declared_and_the_names_of_dynamic_axes_kept(tmp_path: Path) -> None:
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")], "gelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", 8])]),
        opset_imports=[helper.make_opsetid("", 17)])
    source = tmp_path / "gelu.onnx"
    onnx.save(model, str(source))  # the contrib domain is used, never declared

    notes = normalize(source, tmp_path / "n.onnx", None)

    result = graph.load(tmp_path / "n.onnx")
    assert notes["domains_declared"] == ["com.microsoft"]
    assert {o.domain for o in result.opset_import} == {"", "com.microsoft"}
    dims = [d.dim_param for d in result.graph.input[0].type.tensor_type.shape.dim[:2]]
    assert dims == ["batch", "tokens"]


def test_generated_inputs_take_a_size_the_detector_accepts() -> None:
    detector = _paddle("det")
    plan = model_data.plan_synthetic(detector)
    # 16 px is too small for its five stride-2 stages and FPN additions; 32 is the first size that runs
    assert plan.size == 32 and plan.tried == (16, 32)
    generated = model_data.synthetic_for(detector, seed=0, samples=2)
    assert generated.inputs["x"].shape == (2, 3, 32, 32)
    graph.session(detector).run(None, generated.inputs)


def test_a_model_no_generated_input_runs_asks_for_a_dataset(tmp_path: Path) -> None:
    # The Reshape needs a multiple of 77 elements: none of the sizes tried for the dynamic axis gives one.
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "strict",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 7, 11])],
        [numpy_helper.from_array(np.array([-1, 7, 11], np.int64), "shape")]),
        opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "strict.onnx"
    onnx.save(model, str(path))
    with pytest.raises(DataRequired, match="ran on no generated input.*upload a dataset"):
        model_data.plan_synthetic(path)
    summary = preflight.profile(path)
    assert "ran on no generated input" in summary["synthetic"]["error"]
    assert preflight.check(summary, None, has_dataset=False) and not preflight.check(summary, None, has_dataset=True)
