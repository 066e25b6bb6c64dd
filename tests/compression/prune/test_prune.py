"""Pruning on the real example models: shapes really shrink, tied channels stay tied, and the result still runs.

The strongest check is an equivalence: a structurally pruned model must compute exactly what the original
computes with the removed channels silenced (their weights and bias zeroed where a ReLU/GELU maps 0 to 0, or
their consumers' input weights zeroed otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.compression import graph
from app.compression import synthetic as synthetic_data
from app.compression.config import PruneStep
from app.compression.context import StepContext
from app.compression.data import ModelData
from app.compression.errors import DataRequired, UnsupportedModel
from app.compression.prune import run
from tests.helpers import CNN, MLP, TRANSFORMER

MakeCtx = Callable[..., StepContext]


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in graph.load(path).graph.initializer}


def _kept_rows(original: np.ndarray, pruned: np.ndarray) -> list[int]:
    """Index in `original` of each row of `pruned` (rows are copied bit for bit, in their original order)."""
    flat = original.reshape(len(original), -1)
    found = []
    for row in pruned.reshape(len(pruned), -1):
        matches = np.nonzero((flat == row).all(axis=1))[0]
        assert len(matches) >= 1, "a pruned row is not a row of the original"
        found.append(int(matches[0]))
    assert found == sorted(found) and len(set(found)) == len(found)
    return found


def _outputs(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    result: np.ndarray = graph.session(path).run(None, feeds)[0]
    return result


def _with_weights(source: Path, target: Path, changes: dict[str, np.ndarray]) -> Path:
    model = graph.load(source)
    for tensor in model.graph.initializer:
        if tensor.name in changes:
            tensor.CopyFrom(numpy_helper.from_array(changes[tensor.name], tensor.name))
    graph.save(model, target)
    return target


def _prune(model: Path, tmp_path: Path, make_ctx: MakeCtx, train: ModelData | None = None,
           **step: Any) -> tuple[Path, dict[str, Any]]:
    output = tmp_path / f"pruned-{step.get('mode')}-{step.get('importance', 'l2')}.onnx"
    notes = run(model, output, PruneStep(**step), make_ctx(model, train))
    graph.check_step_output(model, output, "prune")
    return output, notes


# -- unstructured --------------------------------------------------------------------------------------------------


def test_unstructured_reaches_the_global_sparsity_and_only_gzip_shrinks(tmp_path: Path, make_ctx: MakeCtx,
                                                                        mlp_data: ModelData) -> None:
    output, notes = _prune(MLP, tmp_path, make_ctx, mlp_data, mode="unstructured", sparsity=0.6)
    before, after = _weights(MLP), _weights(output)
    names = ["net.0.weight", "net.2.weight", "net.4.weight"]
    total = sum(before[n].size for n in names)
    assert total == 17024 and notes["weights"]["total"] == total
    assert sum(int(np.count_nonzero(after[n])) for n in names) == round(0.4 * total) == notes["weights"]["nonzero"]
    for name in ("net.0.bias", "net.2.bias", "net.4.bias"):
        np.testing.assert_array_equal(after[name], before[name])
    # One global threshold: every surviving weight is at least as large as every removed one.
    survivors = np.concatenate([np.abs(after[n][after[n] != 0]) for n in names])
    removed = np.concatenate([np.abs(before[n][after[n] == 0]) for n in names])
    assert survivors.min() >= removed.max() and notes["threshold"] == pytest.approx(removed.max())
    assert all(after[n].shape == before[n].shape for n in names)
    assert {layer["weight"] for layer in notes["layers"]} == set(names)
    assert notes["achieved_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert notes["parameters_after"] == notes["parameters_before"] == 17226
    assert notes["nonzero_parameters_after"] == notes["nonzero_parameters_before"] - (total - round(0.4 * total))
    assert notes["gzip_bytes"]["pruned"] < 0.8 * notes["gzip_bytes"]["original"]
    assert notes["size_bytes"]["pruned"] == pytest.approx(notes["size_bytes"]["original"], rel=0.01)
    assert _outputs(output, {"input": mlp_data.inputs["input"][:5]}).shape == (5, 10)
    assert notes["accuracy_before_recovery"]["original"] == pytest.approx(0.9756, abs=1e-4)


# -- structured ----------------------------------------------------------------------------------------------------


def test_structured_mlp_halves_the_hidden_layers_and_keeps_the_classifier(tmp_path: Path, make_ctx: MakeCtx,
                                                                          mlp_data: ModelData) -> None:
    output, notes = _prune(MLP, tmp_path, make_ctx, mlp_data, mode="structured", sparsity=0.5)
    before, after = _weights(MLP), _weights(output)
    assert after["net.0.weight"].shape == (64, 64) and after["net.0.bias"].shape == (64,)
    assert after["net.2.weight"].shape == (32, 64) and after["net.2.bias"].shape == (32,)
    assert after["net.4.weight"].shape == (10, 32) and after["net.4.bias"].shape == (10,)
    assert [(g["original"], g["kept"]) for g in notes["pruned"]] == [(128, 64), (64, 32)]
    assert [s["weight"] for s in notes["skipped"]] == ["net.4.weight"]
    assert "graph output 'logits'" in notes["skipped"][0]["reason"]
    assert notes["parameters_before"] == 17226 and notes["parameters_after"] == 64 * 65 + 32 * 65 + 10 * 33

    # Equivalence: the original with the removed neurons zeroed (ReLU(0) = 0) computes the same logits.
    kept0 = _kept_rows(before["net.0.weight"], after["net.0.weight"])
    kept1 = _kept_rows(before["net.2.weight"][:, kept0], after["net.2.weight"])
    masked = {k: v.copy() for k, v in before.items()}
    for weight, bias, kept in (("net.0.weight", "net.0.bias", kept0), ("net.2.weight", "net.2.bias", kept1)):
        gone = np.setdiff1d(np.arange(len(masked[weight])), kept)
        masked[weight][gone] = 0
        masked[bias][gone] = 0
    reference = _with_weights(MLP, tmp_path / "masked.onnx", masked)
    feeds = {"input": mlp_data.inputs["input"][:64]}
    np.testing.assert_allclose(_outputs(output, feeds), _outputs(reference, feeds), atol=1e-4)
    assert notes["latency"]["pruned_ms"] > 0


def test_structured_cnn_prunes_channels_through_batchnorm_residual_and_flatten(
        tmp_path: Path, make_ctx: MakeCtx, cnn_data: ModelData) -> None:
    output, notes = _prune(CNN, tmp_path, make_ctx, cnn_data, mode="structured", sparsity=0.5)
    before, after = _weights(CNN), _weights(output)
    expected = {"features.0.weight": (8, 1, 3, 3), "features.3.weight": (16, 8, 3, 3),
                "features.6.conv1.weight": (16, 16, 3, 3), "features.6.conv2.weight": (16, 16, 3, 3),
                "classifier.1.weight": (32, 16 * 4 * 4), "classifier.3.weight": (10, 32)}
    assert {name: after[name].shape for name in expected} == expected
    for bn, width in (("features.1", 8), ("features.4", 16), ("features.6.bn1", 16), ("features.6.bn2", 16)):
        for part in ("weight", "bias", "running_mean", "running_var"):
            assert after[f"{bn}.{part}"].shape == (width,)
    assert int(numpy_helper.to_array(next(t for t in graph.load(output).graph.initializer
                                          if t.name == "val_53"))[1]) == 256

    # Recover which channels each layer kept from the weights alone.
    k0 = _kept_rows(before["features.0.weight"], after["features.0.weight"])
    k3 = _kept_rows(before["features.3.weight"][:, k0], after["features.3.weight"])
    k_c1 = _kept_rows(before["features.6.conv1.weight"][:, k3], after["features.6.conv1.weight"])
    k_c2 = _kept_rows(before["features.6.conv2.weight"][:, k_c1], after["features.6.conv2.weight"])
    assert k3 == k_c2  # the residual Add's two branches lose the same channels
    for bn, kept in (("features.1", k0), ("features.4", k3), ("features.6.bn1", k_c1), ("features.6.bn2", k_c2)):
        np.testing.assert_array_equal(after[f"{bn}.running_var"], before[f"{bn}.running_var"][kept])
    rows = (np.array(k3)[:, None] * 16 + np.arange(16)).ravel()  # each channel feeds 4x4 flattened rows
    k_l1 = _kept_rows(before["classifier.1.weight"][:, rows], after["classifier.1.weight"])
    np.testing.assert_array_equal(after["classifier.3.weight"], before["classifier.3.weight"][:, k_l1])
    group = next(g for g in notes["pruned"] if len(g["layers"]) == 2)
    assert {layer["weight"] for layer in group["layers"]} == {"features.3.weight", "features.6.conv2.weight"}
    assert (group["original"], group["kept"]) == (32, 16)

    # Equivalence: silencing the removed channels at their consumers gives the pruned model's logits.
    masked = {k: v.copy() for k, v in before.items()}
    for weight, kept in (("features.3.weight", k0), ("features.6.conv1.weight", k3),
                         ("features.6.conv2.weight", k_c1), ("classifier.1.weight", rows.tolist()),
                         ("classifier.3.weight", k_l1)):
        masked[weight][:, np.setdiff1d(np.arange(masked[weight].shape[1]), kept)] = 0
    reference = _with_weights(CNN, tmp_path / "masked.onnx", masked)
    feeds = {"input": cnn_data.inputs["input"][:64]}
    logits = _outputs(output, feeds)
    assert logits.shape == (64, 10)
    np.testing.assert_allclose(logits, _outputs(reference, feeds), atol=1e-4)

    assert notes["parameters_after"] < notes["parameters_before"] / 3
    accuracy = notes["accuracy_before_recovery"]
    assert accuracy["original"] == pytest.approx(0.9933, abs=1e-4) and 0.0 <= accuracy["pruned"] <= 1.0
    assert accuracy["samples"] == len(cnn_data)


def test_structured_transformer_prunes_the_ffn_and_skips_attention(tmp_path: Path, make_ctx: MakeCtx,
                                                                   transformer_data: ModelData) -> None:
    # channels, asked for by name: without an importance, `structured` with a dataset cuts the tiny transformer's
    # heads, neurons and blocks instead (its packed QKV is found: test_packed_attention.py)
    output, notes = _prune(TRANSFORMER, tmp_path, make_ctx, transformer_data, mode="structured", sparsity=0.5,
                           importance="l2")
    before, after = _weights(TRANSFORMER), _weights(output)
    for layer in (0, 1):
        assert after[f"layers.{layer}.ffn.0.weight.T"].shape == (64, 64)
        assert after[f"layers.{layer}.ffn.0.bias"].shape == (64,)
        assert after[f"layers.{layer}.ffn.2.weight.T"].shape == (64, 64)
        assert after[f"layers.{layer}.attn.qkv.weight.T"].shape == (64, 192)
    skipped = {s["weight"]: s["reason"] for s in notes["skipped"]}
    assert "Reshape" in skipped["layers.0.attn.qkv.weight.T"] and "Reshape" in skipped["layers.1.attn.qkv.weight.T"]
    assert "layers.0.attn.out.weight.T" in skipped and "head.weight" in skipped
    assert [(g["original"], g["kept"]) for g in notes["pruned"]] == [(128, 64), (128, 64)]

    masked = {k: v.copy() for k, v in before.items()}  # GELU(0) = 0: zeroed hidden neurons contribute nothing
    for layer in (0, 1):
        name = f"layers.{layer}.ffn.0.weight.T"
        kept = _kept_rows(before[name].T, after[name].T)
        gone = np.setdiff1d(np.arange(128), kept)
        masked[name][:, gone] = 0
        masked[f"layers.{layer}.ffn.0.bias"][gone] = 0
    reference = _with_weights(TRANSFORMER, tmp_path / "masked.onnx", masked)
    feeds = dict(transformer_data.inputs)
    np.testing.assert_allclose(_outputs(output, feeds), _outputs(reference, feeds), atol=1e-4)
    assert notes["accuracy_before_recovery"] is None  # no labels


def _branchy_model(path: Path) -> Path:
    """Concat of two conv branches, a per-channel Mul, a residual Add, ReduceMean, and a branch through LRN."""
    rng = np.random.default_rng(0)

    def const(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a0"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a0"], ["a"]),
        helper.make_node("Conv", ["x", "wb", "bb"], ["b0"]), helper.make_node("Relu", ["b0"], ["b"]),
        helper.make_node("Concat", ["a", "b"], ["cat"], axis=1),
        helper.make_node("Mul", ["cat", "k"], ["scaled"]),
        helper.make_node("Conv", ["scaled", "wc", "bc"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["c"]),
        helper.make_node("Conv", ["x", "wd", "bd"], ["d0"]), helper.make_node("Relu", ["d0"], ["d"]),
        helper.make_node("Add", ["c", "d"], ["r"]),
        helper.make_node("ReduceMean", ["r", "axes"], ["pooled"], keepdims=0),
        helper.make_node("Conv", ["x", "we"], ["e0"]), helper.make_node("LRN", ["e0"], ["e1"], size=3),
        helper.make_node("GlobalAveragePool", ["e1"], ["e2"]), helper.make_node("Flatten", ["e2"], ["e"]),
        helper.make_node("Concat", ["pooled", "e"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "wg", "bg"], ["y"], transB=1),
    ]
    initializers = [
        const("wa", 8, 3, 3, 3), const("ba", 8), const("wb", 6, 3, 1, 1), const("bb", 6), const("k", 1, 14, 1, 1),
        const("wc", 10, 14, 3, 3), const("bc", 10), const("wd", 10, 3, 1, 1), const("bd", 10),
        const("we", 4, 3, 1, 1), const("wg", 5, 14), const("bg", 5),
        numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes"),
    ]
    model = helper.make_model(helper.make_graph(
        nodes, "branchy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])], initializers,
    ), opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    graph.save(model, path)
    return path


def test_concat_offsets_reductions_and_unsafe_ops(tmp_path: Path, make_ctx: MakeCtx) -> None:
    source = _branchy_model(tmp_path / "branchy.onnx")
    output, notes = _prune(source, tmp_path, make_ctx, mode="structured", sparsity=0.5, importance="l1")
    before, after = _weights(source), _weights(output)
    assert after["wa"].shape == (4, 3, 3, 3) and after["wb"].shape == (3, 3, 1, 1)
    assert after["k"].shape == (1, 7, 1, 1) and after["wc"].shape == (5, 7, 3, 3)
    assert after["wd"].shape == (5, 3, 1, 1) and after["wg"].shape == (5, 5 + 4)
    assert after["we"].shape == (4, 3, 1, 1)  # LRN mixes neighbouring channels: that branch is left alone
    skipped = {s["weight"]: s["reason"] for s in notes["skipped"]}
    assert "LRN" in skipped["we"] and "graph output 'y'" in skipped["wg"]

    ka = _kept_rows(before["wa"], after["wa"])
    kb = _kept_rows(before["wb"], after["wb"])
    concat_kept = ka + [8 + i for i in kb]  # channels map to offsets in the concatenated tensor
    np.testing.assert_array_equal(after["k"], before["k"][:, concat_kept])
    kc = _kept_rows(before["wc"][:, concat_kept], after["wc"])
    assert kc == _kept_rows(before["wd"], after["wd"])
    np.testing.assert_array_equal(after["wg"], before["wg"][:, kc + [10, 11, 12, 13]])

    masked = {k: v.copy() for k, v in before.items()}  # ReLU(0) = 0 after each pruned conv
    for weight, bias, kept in (("wa", "ba", ka), ("wb", "bb", kb), ("wc", "bc", kc), ("wd", "bd", kc)):
        gone = np.setdiff1d(np.arange(len(masked[weight])), kept)
        masked[weight][gone] = 0
        masked[bias][gone] = 0
    reference = _with_weights(source, tmp_path / "masked.onnx", masked)
    feeds = {"x": np.random.default_rng(1).standard_normal((7, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(_outputs(output, feeds), _outputs(reference, feeds), atol=1e-4)
    assert notes["latency"] is not None  # timed on generated inputs: the step had no data


def test_axis_moves_follow_the_channels(tmp_path: Path, make_ctx: MakeCtx) -> None:
    """MatMul + bias, then Unsqueeze, Transpose and Squeeze move the neuron axis before a transB=0 Gemm."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("Unsqueeze", ["h2", "one"], ["h3"]),
        helper.make_node("Transpose", ["h3"], ["h4"], perm=[0, 2, 1]),
        helper.make_node("Squeeze", ["h4", "two"], ["h5"]),
        helper.make_node("Gemm", ["h5", "w2"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array(rng.standard_normal((6, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "two"),
    ]
    model = helper.make_model(helper.make_graph(
        nodes, "moves", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], initializers,
    ), opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    source = graph.save(model, tmp_path / "moves.onnx")
    output, notes = _prune(source, tmp_path, make_ctx, mode="structured", sparsity=0.5)
    before, after = _weights(source), _weights(output)
    assert (after["w1"].shape, after["b1"].shape, after["w2"].shape) == ((6, 4), (4,), (4, 3))
    kept = _kept_rows(before["w1"].T, after["w1"].T)
    np.testing.assert_array_equal(after["w2"], before["w2"][kept])
    masked = {k: v.copy() for k, v in before.items()}
    gone = np.setdiff1d(np.arange(8), kept)
    masked["w1"][:, gone] = 0
    masked["b1"][gone] = 0
    reference = _with_weights(source, tmp_path / "masked.onnx", masked)
    feeds = {"x": rng.standard_normal((5, 6)).astype(np.float32)}
    np.testing.assert_allclose(_outputs(output, feeds), _outputs(reference, feeds), atol=1e-5)


def test_taylor_importance_ranks_by_data(tmp_path: Path, make_ctx: MakeCtx, mlp_data: ModelData) -> None:
    output, notes = _prune(MLP, tmp_path, make_ctx, mlp_data.take(128), mode="structured", sparsity=0.5,
                           importance="taylor")
    assert _weights(output)["net.0.weight"].shape == (64, 64)
    assert notes["importance"] == "taylor" and "128 samples" in notes["importance_detail"]
    assert all(g["importance"] == "taylor" for g in notes["pruned"])


# -- bad input -----------------------------------------------------------------------------------------------------


def test_taylor_without_data_is_refused(tmp_path: Path, make_ctx: MakeCtx) -> None:
    step = PruneStep(mode="structured", sparsity=0.5, importance="taylor")
    with pytest.raises(DataRequired, match="taylor"):
        run(MLP, tmp_path / "out.onnx", step, make_ctx(MLP))
    noise = synthetic_data(graph.io_info(MLP)[0], seed=0, samples=8)
    with pytest.raises(DataRequired, match="dataset"):
        run(MLP, tmp_path / "out.onnx", step, make_ctx(MLP, noise))


@pytest.mark.parametrize("mode", ["unstructured", "structured"])
def test_a_model_without_prunable_layers_is_unsupported(tmp_path: Path, make_ctx: MakeCtx,
                                                        mode: Literal["unstructured", "structured"]) -> None:
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    ), opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    source = graph.save(model, tmp_path / "add.onnx")
    with pytest.raises(UnsupportedModel, match="no"):
        run(source, tmp_path / "out.onnx", PruneStep(mode=mode, sparsity=0.5), make_ctx(source))


def test_a_model_whose_layers_all_feed_outputs_is_unsupported(tmp_path: Path, make_ctx: MakeCtx) -> None:
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), "w")],
    ), opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    source = graph.save(model, tmp_path / "linear.onnx")
    with pytest.raises(UnsupportedModel, match="graph output 'y'"):
        run(source, tmp_path / "out.onnx", PruneStep(mode="structured", sparsity=0.5), make_ctx(source))
