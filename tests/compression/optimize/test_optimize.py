"""The optimize step: the saved graph opens on CPU, computes the same outputs, and reports what it fused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.compression import graph, optimize
from app.compression.config import OptimizeStep
from app.compression.context import StepContext
from app.compression.data import ModelData
from app.compression.optimize.attention import fuse_attention
from tests.helpers import CNN, TRANSFORMER

MakeCtx = Callable[..., StepContext]


def _outputs(path: Path, data: ModelData) -> np.ndarray:
    session = graph.session(path)
    return np.concatenate([session.run(None, feeds)[0] for feeds in data.batches(32)])


def _optimize(model: Path, level: str, tmp_path: Path, ctx: StepContext) -> tuple[Path, dict[str, Any]]:
    output = tmp_path / f"{model.stem}-{level}.onnx"
    notes = optimize.run(model, output, OptimizeStep.model_validate({"level": level}), ctx)
    graph.check_step_output(model, output, f"optimize ({level})")
    assert json.loads(json.dumps(notes)) == notes
    return output, notes


def _declared_domains(path: Path) -> set[str]:
    return {o.domain for o in graph.load(path).opset_import}


@pytest.mark.parametrize("level", ["basic", "extended"])
def test_onnxruntime_levels_on_the_cnn_keep_its_outputs(
    tmp_path: Path, make_ctx: MakeCtx, cnn_data: ModelData, level: str,
) -> None:
    output, notes = _optimize(CNN, level, tmp_path, make_ctx(CNN, cnn_data))

    np.testing.assert_allclose(_outputs(output, cnn_data), _outputs(CNN, cnn_data), atol=1e-4)
    counts = notes["op_counts"]["output"]
    assert "BatchNormalization" not in counts  # folded into the convolutions at both levels
    if level == "extended":
        assert notes["fused"]["com.microsoft:FusedConv"] >= 3
        assert _declared_domains(output) == {"", "com.microsoft"}  # only the domains its nodes use
    else:
        assert notes["fused"] == {} and _declared_domains(output) == {""}
    assert set(notes["speedup"]) == {"batch_1", "batch_32"} and notes["pays"] in (True, False)
    assert notes["verdict"] and notes["load_ms"]["output"] > 0


def test_extended_level_on_the_transformer_keeps_its_outputs(
    tmp_path: Path, make_ctx: MakeCtx, transformer_data: ModelData,
) -> None:
    output, _ = _optimize(TRANSFORMER, "extended", tmp_path, make_ctx(TRANSFORMER, transformer_data))

    np.testing.assert_allclose(_outputs(output, transformer_data), _outputs(TRANSFORMER, transformer_data),
                               atol=1e-4)


def test_transformer_level_fuses_packed_attention_and_keeps_only_fusions_that_pay(
    tmp_path: Path, make_ctx: MakeCtx, transformer_data: ModelData, monkeypatch: pytest.MonkeyPatch,
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    output, notes = _optimize(TRANSFORMER, "transformer", tmp_path, make_ctx(TRANSFORMER, transformer_data))

    np.testing.assert_allclose(_outputs(output, transformer_data), _outputs(TRANSFORMER, transformer_data),
                               atol=1e-4)
    assert notes["packed_attention_fused"] == 2 and notes["num_heads"] == 4 and notes["hidden_size"] == 64
    search = notes["fusion_search"]
    assert search[0]["without"] == [] and {"attention", "skip_layer_norm", "gelu"} <= set(search[0]["fired"])
    assert len(search) == 1 + len(search[0]["fired"])  # each fired family was tried without
    assert set(notes["fusions_kept"]).isdisjoint(notes["fusions_dropped"])
    if "attention" in notes["fusions_kept"]:
        assert notes["op_counts"]["output"]["com.microsoft:Attention"] == 2
    assert set(notes["speedup"]) == {"batch_1", "batch_32"}
    assert list(cwd.iterdir()) == []


def test_attention_fusion_matches_the_export_and_computes_the_same(
    tmp_path: Path, transformer_data: ModelData,
) -> None:
    model = graph.load(TRANSFORMER)
    fused = fuse_attention(model)
    path = graph.save(model, tmp_path / "fused.onnx")

    assert (fused.count, fused.num_heads, fused.hidden_size) == (2, 4, 64)
    ops = [n.op_type for n in model.graph.node]
    assert "Softmax" not in ops and "Slice" not in ops  # the unpacking went with the attention
    rng = np.random.default_rng(0)
    mask = np.ones((3, 40), dtype=np.int64)
    mask[0, 20:] = 0
    feeds = {"input_ids": rng.integers(1, 1000, (3, 40)), "attention_mask": mask}
    np.testing.assert_allclose(graph.session(path).run(None, feeds)[0],
                               graph.session(TRANSFORMER).run(None, feeds)[0], atol=1e-5)


def test_without_measurable_inputs_the_step_still_optimizes_and_says_so(tmp_path: Path, make_ctx: MakeCtx) -> None:
    output, notes = _optimize(TRANSFORMER, "basic", tmp_path, make_ctx(TRANSFORMER))

    assert notes["speedup"] is None and notes["verdict"].startswith("not measured")
    assert notes["fidelity"] is None


def _decomposed_layer_norm(path: Path, opset: int) -> Path:
    """Layer normalization written out in primitive ops at an older opset, as Paddle2ONNX and tf2onnx write it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(value, name) for name, value in (
        ("gamma", rng.uniform(0.5, 1.5, 32).astype(np.float32)), ("beta", rng.normal(0, 0.1, 32).astype(np.float32)),
        ("eps", np.array(1e-5, np.float32)), ("two", np.array(2.0, np.float32)),
        ("w", rng.normal(0, 0.2, (32, 32)).astype(np.float32)))]
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]),
        helper.make_node("Sub", ["x", "mean"], ["centred"]),
        helper.make_node("Pow", ["centred", "two"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["variance"], axes=[-1]),
        helper.make_node("Add", ["variance", "eps"], ["shifted"]),
        helper.make_node("Sqrt", ["shifted"], ["deviation"]),
        helper.make_node("Div", ["centred", "deviation"], ["normalized"]),
        helper.make_node("Mul", ["normalized", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["norm"]),
        helper.make_node("MatMul", ["norm", "w"], ["y"]),
    ]
    model = helper.make_model(helper.make_graph(
        nodes, "layer_norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, 32])], weights),
        opset_imports=[helper.make_opsetid("", opset)])
    onnx.save(model, str(path))
    return path


def test_layer_norm_fused_into_an_older_opset_model_raises_its_opset_to_17(tmp_path: Path, make_ctx: MakeCtx) -> None:
    import onnx

    from app.compression.optimize.transformer import TransformerFusions

    model = _decomposed_layer_norm(tmp_path / "norm13.onnx", 13)
    data = ModelData({"x": np.random.default_rng(1).normal(size=(24, 16, 32)).astype(np.float32)}, None, "dataset")
    fused = TransformerFusions(model, tmp_path, lambda candidate: None).build(frozenset())
    proto = graph.load(fused.path)
    assert "LayerNormalization" in graph.op_types(proto) and graph.default_opset(proto) == 17
    onnx.checker.check_model(proto, full_check=True)
    np.testing.assert_allclose(_outputs(fused.path, data), _outputs(model, data), atol=1e-4)
    # and the whole step, whichever fusions it keeps, hands on a model the checker accepts
    _optimize(model, "transformer", tmp_path, make_ctx(model, data))
