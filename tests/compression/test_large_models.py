"""Models past protobuf's 2 GB limit: the same steps, their weights in external data beside the graph.

Protobuf's limit is lowered for these tests, so that a model of a few megabytes takes the path a 20 GB one does
(building a real 2 GB model per test would take minutes and gigabytes; benchmarks/text.py measures one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.compression import Budget, ModelData, graph, parse_recipe, run_recipe

WIDTH, LAYERS = 256, 4


@pytest.fixture
def large(monkeypatch: pytest.MonkeyPatch) -> None:
    # Past 200 KB is "large": the original (1 MB), its INT8 (256 KB) and FP16 variants are; its INT4 one is not.
    monkeypatch.setattr(graph, "LARGE_MODEL_BYTES", 200 * 1024)
    # And what protobuf refuses past 2 GB is refused past the lowered limit: onnx's shape inference serializes
    # the whole model (as onnxruntime's float16 converter and quantizers call it).
    infer = onnx.shape_inference.infer_shapes

    def refusing_large(model: onnx.ModelProto | bytes, *args: Any, **kwargs: Any) -> onnx.ModelProto:
        if isinstance(model, onnx.ModelProto) and model.ByteSize() > graph.LARGE_MODEL_BYTES:
            raise ValueError("Failed to serialize proto (a model past the limit)")
        return infer(model, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", refusing_large)


def _mlp_with_external_data(folder: Path) -> Path:
    """A trained-like MLP (weights scaled so activations stay in range), saved as exporters save large models."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "x"
    for index in range(LAYERS):
        weights.append(numpy_helper.from_array(
            (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32), f"w{index}"))
        weights.append(numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32) * 0.1, f"b{index}"))
        nodes += [helper.make_node("MatMul", [previous, f"w{index}"], [f"m{index}"]),
                  helper.make_node("Add", [f"m{index}", f"b{index}"], [f"a{index}"]),
                  helper.make_node("Relu", [f"a{index}"], [f"h{index}"])]
        previous = f"h{index}"
    model = helper.make_model(helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["batch", WIDTH])], weights),
        opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir()
    path = folder / "mlp.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=1024)
    return path


def _data() -> ModelData:
    return ModelData({"x": np.random.default_rng(1).standard_normal((96, WIDTH)).astype(np.float32)}, None,
                     "dataset")


# Half of a random MLP's weights cannot be zeroed at no cost: pruning gets a lower floor.
PRESETS = [("int8-dynamic", 0.95), ("fp16", 0.99), ("optimize", 0.999), ("int8-static", 0.95), ("prune-50", 0.85)]


@pytest.mark.parametrize(("preset", "floor"), PRESETS, ids=[p for p, _ in PRESETS])
def test_presets_write_large_variants_as_a_graph_and_its_external_data(
        large: None, tmp_path: Path, preset: str, floor: float) -> None:
    original = _mlp_with_external_data(tmp_path / "original")
    output = tmp_path / "out" / "variant.onnx"
    output.parent.mkdir()
    result = run_recipe(original=original, output=output, recipe=parse_recipe(preset), data=_data(),
                        budget=Budget(metric="cosine", max_drop=0.05), timing_seconds=0.05)
    files = graph.model_files(output)
    assert [f.name for f in files] == ["variant.onnx", "variant.onnx.data"]
    # The graph file holds no weights: they are all in the data file.
    assert output.stat().st_size < 64 * 1024 < files[1].stat().st_size
    assert result.report["size_bytes"] == graph.model_bytes(output)
    assert result.report["original"]["size_bytes"] == graph.model_bytes(original)
    assert result.report["fidelity"]["cosine_mean"] > floor
    # The variant is what onnxruntime runs, and it answers as the original does.
    feed = {"x": _data().inputs["x"][:8]}
    expected = ort.InferenceSession(str(original)).run(None, feed)[0]
    answer = ort.InferenceSession(str(output)).run(None, feed)[0]
    cosine = (expected * answer).sum(1) / np.linalg.norm(expected, axis=1) / np.linalg.norm(answer, axis=1)
    assert cosine.mean() > floor
    assert not list(original.parent.glob("*.onnx.data"))  # the original folder is untouched


def test_a_small_result_of_a_large_model_is_one_file(large: None, tmp_path: Path) -> None:
    original = _mlp_with_external_data(tmp_path / "original")
    output = tmp_path / "variant.onnx"
    output.with_name("variant.onnx.data").write_bytes(b"left by an earlier, larger result")
    # INT4 weights take an eighth of the float32 ones: under the (lowered) limit, the variant is one file.
    run_recipe(original=original, output=output, recipe=parse_recipe("int4-weight"), data=_data(),
               budget=Budget(metric="cosine", max_drop=0.1), timing_seconds=0.05)
    assert graph.model_files(output) == [output]
    assert not output.with_name("variant.onnx.data").exists()
    ort.InferenceSession(str(output)).run(None, {"x": _data().inputs["x"][:2]})


def test_graph_rewrites_past_the_limit_keep_every_weight(large: None, tmp_path: Path) -> None:
    original = _mlp_with_external_data(tmp_path / "original")
    model = graph.load(original)
    before = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    inferred = graph.infer_shapes(model)
    assert {t.name for t in inferred.graph.initializer} == set(before)
    for tensor in inferred.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), before[tensor.name])
    # The caller's model keeps its weights in memory after a save with external data.
    graph.save(model, tmp_path / "again.onnx")
    for tensor in model.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), before[tensor.name])
    assert len(graph.model_files(tmp_path / "again.onnx")) == 2
