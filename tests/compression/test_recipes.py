"""Presets and chains run end to end through the recipe runner and the auto search."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.compression import (
    Budget,
    Cancelled,
    CancelToken,
    DataRequired,
    ModelData,
    UnsupportedModel,
    parse_recipe,
    run_recipe,
    search,
)
from app.compression.graph import io_info, load
from app.compression.recipes import prepare_data
from app.compression.search import closeness, model_family, score
from tests.helpers import CNN, MLP, TRANSFORMER, convolutions_only

SUITS = [
    (CNN, "int8-static"), (CNN, "prune-50"), (CNN, "shrink-50"), (CNN, "fp16"), (CNN, "optimize"),
    (MLP, "int8-dynamic"), (MLP, "int8-static"), (MLP, "shrink-50"),
    (TRANSFORMER, "int8-dynamic"), (TRANSFORMER, "int4-weight"), (TRANSFORMER, "fp16"), (TRANSFORMER, "optimize"),
]


def _data(model: Path, cnn_data: ModelData, mlp_data: ModelData, transformer_data: ModelData) -> ModelData:
    return {CNN: cnn_data, MLP: mlp_data, TRANSFORMER: transformer_data}[model]


@pytest.mark.parametrize(("model", "preset"), SUITS, ids=[f"{m.stem}-{p}" for m, p in SUITS])
def test_presets_on_the_models_they_suit(
    tmp_path: Path, model: Path, preset: str, cnn_data: ModelData, mlp_data: ModelData,
    transformer_data: ModelData,
) -> None:
    stages: list[tuple[float, str]] = []
    output = tmp_path / "out.onnx"
    result = run_recipe(original=model, output=output, recipe=parse_recipe(preset),
                        data=_data(model, cnn_data, mlp_data, transformer_data),
                        progress=lambda f, s: stages.append((f, s)))
    report = result.report
    assert output.is_file() and report["size_bytes"] == output.stat().st_size
    assert report["fidelity"]["data"] == "dataset" and report["fidelity"]["samples"] > 0
    assert report["latency_ms"]["batch_1"]["p50"] > 0 and report["speedup"]["batch_1"] > 0
    assert report["original"]["size_bytes"] == model.stat().st_size
    assert len(report["steps"]) == len(parse_recipe(preset).steps)
    assert report["fidelity"]["cosine_mean"] > 0.9
    if report["fidelity"]["accuracy"] is not None:
        assert report["fidelity"]["accuracy"] >= report["fidelity"]["original_accuracy"] - 0.05
    fractions = [f for f, _ in stages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    sidecar = json.loads(output.with_suffix(".recipe.json").read_text())
    assert sidecar["recipe"]["name"] == preset and "onnxruntime" in sidecar["versions"]


def test_structured_prune_then_static_int8_chain(tmp_path: Path, cnn_data: ModelData) -> None:
    recipe = parse_recipe({"steps": [{"op": "prune", "mode": "structured", "sparsity": 0.5},
                                     {"op": "distill", "epochs": 5},
                                     {"op": "quantize", "mode": "static"}]})
    result = run_recipe(original=CNN, output=tmp_path / "chain.onnx", recipe=recipe, data=cnn_data)
    ops = {node.op_type for node in load(tmp_path / "chain.onnx").graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert result.report["parameters"] < 0.4 * result.report["original"]["parameters"]
    assert result.report["size_ratio"] < 0.2


def test_recipes_fail_clearly(tmp_path: Path, cnn_data: ModelData) -> None:
    with pytest.raises(UnsupportedModel, match="MatMul") as failed:
        run_recipe(original=convolutions_only(tmp_path / "convs.onnx"), output=tmp_path / "a.onnx",
                   recipe=parse_recipe("int4-weight"))
    assert failed.value.step == "step 1/1: quantize (int4)"
    assert failed.value.describe().startswith("step 1/1: quantize (int4): int4 needs MatMul")
    with pytest.raises(DataRequired):
        run_recipe(original=CNN, output=tmp_path / "b.onnx", recipe=parse_recipe("shrink-50"), data=None)
    inputs, _ = io_info(TRANSFORMER)
    with pytest.raises(DataRequired, match="input_ids"):
        run_recipe(original=TRANSFORMER, output=tmp_path / "c.onnx", recipe=parse_recipe("int8-dynamic"))
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        run_recipe(original=CNN, output=tmp_path / "d.onnx", recipe=parse_recipe("int8-static"), data=cnn_data,
                   cancel=token)
    assert not (tmp_path / "d.onnx").exists()


def test_fidelity_is_measured_on_samples_that_shaped_nothing(cnn_data: ModelData) -> None:
    train, held_out = prepare_data(CNN, cnn_data, seed=0)
    assert train is not None
    shaped = {row.tobytes() for row in train.inputs["input"]}
    assert not any(row.tobytes() in shaped for row in held_out.inputs["input"])
    assert len(train) + len(held_out) == len(cnn_data)


def test_auto_returns_the_best_candidate_within_budget(tmp_path: Path, mlp_data: ModelData) -> None:
    assert model_family(MLP) == "mlp" and model_family(CNN) == "cnn" and model_family(TRANSFORMER) == "transformer"
    result = search(original=MLP, output=tmp_path / "auto.onnx", data=mlp_data,
                    budget=Budget(metric="agreement", max_drop=0.02), objective="size")
    assert result.winner is not None and result.output is not None and result.report is not None
    names = [c["name"] for c in result.candidates]
    assert names == ["int8-dynamic", "int8-static", "shrink-50", "shrink-50+int8-dynamic"]
    eligible = [c for c in result.candidates if c["report"] and c["report"]["within_budget"]]
    assert eligible, result.candidates
    smallest = min(c["report"]["size_ratio"] for c in eligible)
    assert result.report["size_ratio"] == smallest and result.report["within_budget"]
    sidecar = json.loads((tmp_path / "auto.recipe.json").read_text())
    assert len(sidecar["report"]["auto"]["candidates"]) == 4


def test_speed_objectives_never_pick_a_slower_model() -> None:
    slower = {"within_budget": True, "speedup": {"batch_1": 0.8, "batch_n": 0.9}, "size_ratio": 0.3}
    faster = {"within_budget": True, "speedup": {"batch_1": 1.2, "batch_n": 1.5}, "size_ratio": 0.9}
    over = {"within_budget": False, "speedup": {"batch_1": 3.0, "batch_n": 3.0}, "size_ratio": 0.1}
    assert score(slower, "latency") is None and score(slower, "balanced") is None
    assert score(slower, "size") is not None and score(over, "size") is None
    assert score(faster, "latency") == 1.5
    assert np.isclose(score(faster, "balanced") or 0, (1.5 / 0.9) ** 0.5)
    # as fast within timing noise counts as not slower: a model a quarter the size at 0.98x is worth having
    level = {"within_budget": True, "speedup": {"batch_1": 1.0, "batch_n": 0.98}, "size_ratio": 0.25}
    assert np.isclose(score(level, "balanced") or 0, (0.98 / 0.25) ** 0.5)


def test_without_an_eligible_candidate_the_fallback_prefers_one_within_budget() -> None:
    def report(within: bool, speedup: float, cosine: float) -> dict[str, Any]:
        return {"within_budget": within, "speedup": {"batch_1": speedup, "batch_n": speedup},
                "fidelity": {"cosine_mean": cosine}, "budget": {"metric": "cosine"}}

    slow_but_close = report(True, 0.7, 0.999)
    slower_but_closer = report(True, 0.6, 0.9999)
    fast_but_far = report(False, 2.0, 0.95)
    order = sorted([fast_but_far, slower_but_closer, slow_but_close], key=closeness, reverse=True)
    assert order == [slow_but_close, slower_but_closer, fast_but_far]
    assert closeness(report(False, 1.0, 0.99)) > closeness(fast_but_far)


def test_transformers_with_convolutions_also_try_int8_on_their_matmuls_alone(tmp_path: Path) -> None:
    from app.compression import from_npz
    from app.compression.search import candidate_names, candidate_recipe
    from tests.exports import exporter_models

    vit, bert = exporter_models() / "vit.torchscript.onnx", exporter_models() / "bert.torchscript.onnx"
    names = candidate_names(vit, "transformer")
    assert names[names.index("int8-dynamic") + 1] == "int8-dynamic-matmul"
    assert "int8-dynamic-matmul" not in candidate_names(bert, "transformer")  # no convolution: the same as int8
    data = from_npz(vit.with_name("vit.torchscript.samples.npz"), io_info(vit)[0])
    result = run_recipe(original=vit, output=tmp_path / "vit.onnx", recipe=candidate_recipe("int8-dynamic-matmul"),
                        data=data, timing_seconds=0.05)
    model = load(tmp_path / "vit.onnx")
    produced = {o: n.op_type for n in model.graph.node for o in n.output}
    conv_weights = [n.input[1] for n in model.graph.node if n.op_type in ("Conv", "FusedConv")]
    assert conv_weights and all(produced.get(w) != "DequantizeLinear" for w in conv_weights)  # float weights
    assert {"MatMulInteger", "DynamicQuantizeMatMul"} & {n.op_type for n in model.graph.node}
    assert result.report["fidelity"]["cosine_mean"] > 0.99


def test_transformers_try_a_structured_cut_with_int8_on_real_data(tmp_path: Path) -> None:
    """auto's transformer candidates end with heads, neurons and blocks removed, distilled, then INT8: with 4-bit
    embedding tables where the model has them; a ViT (no table) takes INT8 dynamic after the cut."""
    from app.compression import from_npz
    from app.compression.search import candidate_names, candidate_recipe
    from tests.exports import exporter_models

    bert, vit = exporter_models() / "bert.torchscript.onnx", exporter_models() / "vit.torchscript.onnx"
    assert candidate_names(bert, "transformer")[-1] == "shrink-50-int8"
    assert candidate_names(vit, "transformer")[-1] == "shrink-50+int8-dynamic"
    data = from_npz(bert.with_name("bert.torchscript.samples.npz"), io_info(bert)[0])
    result = run_recipe(original=bert, output=tmp_path / "bert.onnx", recipe=candidate_recipe("shrink-50-int8"),
                        data=data, timing_seconds=0.05)
    ops = {n.op_type for n in load(tmp_path / "bert.onnx").graph.node}
    assert "GatherBlockQuantized" in ops and {"MatMulInteger", "DynamicQuantizeMatMul"} & ops
    prune, distill = result.steps[0]["notes"], result.steps[1]["notes"]
    assert prune["plan"] in {p["plan"] for p in prune["plans"]} and prune["parameters_after"] < \
        prune["parameters_before"]
    assert distill["hidden_states"] and result.report["size_ratio"] < 0.5  # a 27k-parameter model: graph overhead
