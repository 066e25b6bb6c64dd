"""The quantize step on the example models: each mode on the models it suits, and its refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper

from app.compression import graph, optimize, quantize
from app.compression.config import OptimizeStep, QuantizeStep
from app.compression.context import StepContext
from app.compression.data import ModelData
from app.compression.errors import Cancelled, DataRequired, UnsupportedModel
from app.compression.progress import CancelToken, StepProgress
from app.compression.quantize import static as quantize_static
from tests.helpers import CNN, MLP, TRANSFORMER, convolutions_only

MakeCtx = Callable[..., StepContext]


def _outputs(path: Path, data: ModelData) -> np.ndarray:
    session = graph.session(path)
    return np.concatenate([session.run(None, feeds)[0] for feeds in data.batches(64)])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.mean(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in graph.load(path).graph.node}


def _quantize(model: Path, tmp_path: Path, ctx: StepContext, **step: Any) -> tuple[Path, dict[str, Any]]:
    output = tmp_path / f"{model.stem}-{step['mode']}.onnx"
    notes = quantize.run(model, output, QuantizeStep(**step), ctx)
    graph.check_step_output(model, output, f"quantize ({step['mode']})")
    assert json.loads(json.dumps(notes)) == notes  # the report stores them as JSON
    return output, notes


def _size_ratio(original: Path, result: Path) -> float:
    return result.stat().st_size / original.stat().st_size


def test_dynamic_mlp_turns_gemm_layers_into_integer_matmuls_and_measures_both_granularities(
    tmp_path: Path, make_ctx: MakeCtx, mlp_data: ModelData,
) -> None:
    output, notes = _quantize(MLP, tmp_path, make_ctx(MLP, mlp_data), mode="dynamic")

    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= _ops(output) and "Gemm" not in _ops(output)
    assert _size_ratio(MLP, output) < 0.4 and notes["size_ratio"] < 0.4
    assert notes["gemm_rewritten_to_matmul"] == 3 and notes["quantized_nodes"] == 3
    measured = notes["per_channel_measurements"]
    assert set(measured) == {"per_tensor", "per_channel"}
    assert notes["per_channel"] in (True, False) and notes["per_channel_reason"].startswith("more faithful")
    best = max(measured.values(), key=lambda m: (m["agreement"], m["cosine_mean"]))
    assert notes["fidelity"] == best
    assert _cosine(_outputs(MLP, mlp_data), _outputs(output, mlp_data)) > 0.999


def test_dynamic_transformer_quantizes_its_projections(
    tmp_path: Path, make_ctx: MakeCtx, transformer_data: ModelData,
) -> None:
    output, notes = _quantize(TRANSFORMER, tmp_path, make_ctx(TRANSFORMER, transformer_data),
                              mode="dynamic", per_channel=False)

    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= _ops(output)
    assert notes["per_channel"] is False and notes["per_channel_reason"] == "set by the recipe"
    assert list(notes["per_channel_measurements"]) == ["per_tensor"]
    assert _size_ratio(TRANSFORMER, output) < 0.4
    original, quantized = _outputs(TRANSFORMER, transformer_data), _outputs(output, transformer_data)
    assert _cosine(original, quantized) > 0.99


def test_dynamic_cnn_stores_convolution_weights_in_int8_and_computes_them_in_float(
    tmp_path: Path, make_ctx: MakeCtx, cnn_data: ModelData,
) -> None:
    output, notes = _quantize(CNN, tmp_path, make_ctx(CNN, cnn_data), mode="dynamic")

    assert "ConvInteger" not in _ops(output) and "Conv" in _ops(output)
    assert "MatMulInteger" in _ops(output) and notes["op_types_quantized"] == ["MatMul"]
    assert notes["weight_only_op_types"] == ["Conv"] and notes["convolutions_weight_only"]["weights"] == 4
    conv_weights = {n.input[1] for n in graph.load(output).graph.node if n.op_type == "Conv"}
    producers = {o: n for n in graph.load(output).graph.node for o in n.output}
    assert {producers[w].op_type for w in conv_weights} == {"DequantizeLinear"}
    # onnxruntime folds the dequantization into float weights at load only when told to: the model says so
    assert graph.session_config(output) == {"session.disable_quant_qdq": "1"}
    assert notes["size_ratio"] < 0.4
    assert _cosine(_outputs(CNN, cnn_data), _outputs(output, cnn_data)) > 0.999


def test_dynamic_refuses_a_model_with_nothing_to_quantize(tmp_path: Path, make_ctx: MakeCtx) -> None:
    model = tmp_path / "relu.onnx"
    graph.save(helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    ), opset_imports=[helper.make_opsetid("", 17)]), model)

    with pytest.raises(UnsupportedModel, match="no layer with constant weights"):
        quantize.run(model, tmp_path / "out.onnx", QuantizeStep(mode="dynamic"), make_ctx(model))


def test_static_cnn_keeps_the_held_out_predictions(tmp_path: Path, make_ctx: MakeCtx, cnn_data: ModelData) -> None:
    train, held_out = cnn_data.split(0.3, seed=0)
    output, notes = _quantize(CNN, tmp_path, make_ctx(CNN, train), mode="static")

    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(output)
    conv_weights = [i for i in graph.load(output).graph.initializer if len(i.dims) == 4]
    assert conv_weights and all(i.data_type == TensorProto.INT8 for i in conv_weights)
    agreement = np.mean(_outputs(CNN, held_out).argmax(1) == _outputs(output, held_out).argmax(1))
    assert agreement >= 0.97
    assert _size_ratio(CNN, output) < 0.45
    calibration = notes["calibration"]
    assert {k: calibration[k] for k in ("samples", "data", "tensors_skipped_non_finite")} == {
        "samples": 256, "data": "dataset", "tensors_skipped_non_finite": []}
    # Each method measured (no LayerNorm: nothing to smooth); the most faithful one kept.
    tried = calibration["candidates"]
    assert [(c["method"], c["smoothing_alpha"]) for c in tried] == [
        ("minmax", None), ("entropy", None), ("percentile", None)]
    best = max(tried, key=lambda c: (c["fidelity"]["agreement"], c["fidelity"]["cosine_mean"]))
    assert calibration["method"] == best["method"] and notes["smoothing"] is None
    assert notes["per_channel"] is True and notes["activation_type"] == "uint8"
    assert notes["chosen_attempt"] == "all" and notes["fidelity_target"]["met"] is True


def test_static_transformer_keeps_masking_and_normalization_in_float(
    tmp_path: Path, make_ctx: MakeCtx, transformer_data: ModelData,
) -> None:
    output, notes = _quantize(TRANSFORMER, tmp_path, make_ctx(TRANSFORMER, transformer_data), mode="static")

    assert _cosine(_outputs(TRANSFORMER, transformer_data), _outputs(output, transformer_data)) >= 0.98
    excluded = {e["node"]: e["reason"] for e in notes["nodes_excluded"]}
    assert excluded and all("inf/NaN" in reason for reason in excluded.values())  # the -inf attention masks
    assert notes["op_types_skipped"] == {"LayerNormalization": "no integer kernel on CPU"}
    assert notes["calibration"]["tensors_skipped_non_finite"]
    assert notes["fidelity"]["cosine_mean"] >= 0.98


def test_static_retries_with_sensitive_ops_in_float_when_fidelity_drops(
    tmp_path: Path, make_ctx: MakeCtx, transformer_data: ModelData, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A target no 8-bit model meets, to walk the whole ladder on a small model.
    monkeypatch.setattr(quantize_static, "MIN_COSINE", 0.9999999)
    _, notes = _quantize(TRANSFORMER, tmp_path, make_ctx(TRANSFORMER, transformer_data), mode="static")

    names = [a["attempt"] for a in notes["attempts"]]
    assert names == ["all", "sensitive ops in float", "sensitive nodes in float"]
    assert notes["fidelity_target"]["met"] is False
    best = max(notes["attempts"], key=lambda a: a["fidelity"]["cosine_mean"])
    assert notes["chosen_attempt"] == best["attempt"]
    reasons = " ".join(e["reason"] for e in notes["nodes_excluded"])
    assert "MatMul of two activations" in reasons or "per-node sensitivity" in reasons


def test_static_generates_calibration_inputs_only_for_float_models(tmp_path: Path, make_ctx: MakeCtx) -> None:
    _, notes = _quantize(MLP, tmp_path, make_ctx(MLP), mode="static")
    assert notes["calibration"]["data"] == "synthetic"

    with pytest.raises(DataRequired, match="upload a dataset"):
        quantize.run(TRANSFORMER, tmp_path / "t.onnx", QuantizeStep(mode="static"), make_ctx(TRANSFORMER))


@pytest.mark.parametrize(("model", "data_fixture", "max_error"),
                         [(CNN, "cnn_data", 0.05), (TRANSFORMER, "transformer_data", 0.005)])
def test_fp16_halves_the_weights_and_keeps_float32_inputs_and_outputs(
    tmp_path: Path, make_ctx: MakeCtx, request: pytest.FixtureRequest, model: Path, data_fixture: str,
    max_error: float,
) -> None:
    data: ModelData = request.getfixturevalue(data_fixture)
    output, notes = _quantize(model, tmp_path, make_ctx(model, data), mode="fp16")

    assert graph.io_info(output) == graph.io_info(model)  # same names, dtypes (float32 out) and shapes
    weights = [i for i in graph.load(output).graph.initializer if len(i.dims) >= 2]
    assert weights and all(i.data_type == TensorProto.FLOAT16 for i in weights)
    assert np.max(np.abs(_outputs(model, data) - _outputs(output, data))) < max_error
    assert 0.45 < notes["size_ratio"] < 0.6 and notes["float16_initializers"] > 0
    assert notes["cpu_runs_in_float32"]  # this CPU build has no float16 kernels for the heavy ops


def test_int4_packs_transformer_matmuls(tmp_path: Path, make_ctx: MakeCtx, transformer_data: ModelData) -> None:
    output, notes = _quantize(TRANSFORMER, tmp_path, make_ctx(TRANSFORMER, transformer_data), mode="int4")

    nbits = [n for n in graph.load(output).graph.node if n.op_type == "MatMulNBits"]
    # the 8 projections and the output head (a Gemm, rewritten); attention's own MatMuls stay
    assert len(nbits) == notes["quantized_nodes"] == 9 and notes["gemm_rewritten_to_matmul"] == 1
    assert {a.name: a.i for a in nbits[0].attribute}["block_size"] == 32
    assert _cosine(_outputs(TRANSFORMER, transformer_data), _outputs(output, transformer_data)) > 0.99
    # Both compute levels measured; the one written is the one chosen, on every MatMulNBits.
    measured = {m["accuracy_level"]: m for m in notes["accuracy_levels_measured"]}
    assert set(measured) == {1, 4} and notes["accuracy_level_reason"] == "measured"
    assert all(m["latency_ms"] > 0 and m["fidelity"]["cosine_mean"] > 0.98 for m in measured.values())
    written = {next((a.i for a in n.attribute if a.name == "accuracy_level"), 0) for n in nbits}
    assert written == {notes["accuracy_level"]} and notes["fidelity"] == measured[notes["accuracy_level"]]["fidelity"]


def test_int4_writes_a_given_accuracy_level(tmp_path: Path, make_ctx: MakeCtx, transformer_data: ModelData) -> None:
    output, notes = _quantize(TRANSFORMER, tmp_path, make_ctx(TRANSFORMER, transformer_data), mode="int4",
                              accuracy_level=4)

    levels = {a.i for n in graph.load(output).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4} and notes["accuracy_level_reason"] == "given" and "accuracy_levels_measured" not in notes


def test_int4_packs_the_linear_layers_a_cnn_exports_as_gemm(
    tmp_path: Path, make_ctx: MakeCtx, cnn_data: ModelData,
) -> None:
    output, notes = _quantize(CNN, tmp_path, make_ctx(CNN, cnn_data), mode="int4")

    assert notes["gemm_rewritten_to_matmul"] == 2 and notes["quantized_nodes"] == 2
    assert "Gemm" not in _ops(output) and "MatMulNBits" in _ops(output) and "Conv" in _ops(output)
    assert _cosine(_outputs(CNN, cnn_data), _outputs(output, cnn_data)) > 0.99


def test_int4_refuses_a_model_of_convolutions_only(tmp_path: Path, make_ctx: MakeCtx) -> None:
    path = convolutions_only(tmp_path / "convs.onnx")
    with pytest.raises(UnsupportedModel, match="int4 needs MatMul or Gemm layers.*its Conv layers have no 4-bit"):
        quantize.run(path, tmp_path / "out.onnx", QuantizeStep(mode="int4"), make_ctx(path))


def test_preprocessing_falls_back_and_leaves_the_working_directory_clean(
    tmp_path: Path, make_ctx: MakeCtx, transformer_data: ModelData, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Contrib ops from the extended level make symbolic shape inference fail, which is when onnxruntime's own
    # pre-processing tool drops sym_shape_infer_temp.onnx and <uuid>.data files into the current directory.
    extended = tmp_path / "extended.onnx"
    optimize.run(TRANSFORMER, extended, OptimizeStep(level="extended"), make_ctx(TRANSFORMER, transformer_data))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    output, notes = _quantize(extended, tmp_path, make_ctx(TRANSFORMER, transformer_data), mode="dynamic")

    assert notes["symbolic_shape_inference"] is False and "retried without it" in notes["preprocessing_fallback"]
    assert "MatMulInteger" in _ops(output)
    assert list(cwd.iterdir()) == []


def test_cancelling_stops_during_preprocessing(tmp_path: Path, make_ctx: MakeCtx, mlp_data: ModelData) -> None:
    token = CancelToken()

    def report(_fraction: float, stage: str) -> None:
        if "pre-processing" in stage:
            token.cancel()

    ctx = make_ctx(MLP, mlp_data)
    ctx.progress = StepProgress(report, 0.0, 1.0, "quantize", token)
    with pytest.raises(Cancelled):
        quantize.run(MLP, tmp_path / "out.onnx", QuantizeStep(mode="dynamic"), ctx)
