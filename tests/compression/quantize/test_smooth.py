"""SmoothQuant folded into the LayerNorms: exact on what real exporters write, and it pays where outliers are."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from app.compression import graph, quantize
from app.compression.config import QuantizeStep
from app.compression.context import StepContext
from app.compression.data import ModelData, from_arrays, from_npz
from app.compression.normalize import normalize
from app.compression.quantize.smooth import sites, smooth
from tests.exports import exporter_models

MakeCtx = Callable[..., StepContext]
# post-LN (BERT, RoBERTa, DistilBERT: every LayerNorm also feeds a residual sum) and pre-LN (ViT: the LayerNorms
# feed only the projections), from both torch.onnx exporters
EXPORTS = ["bert.torchscript", "bert.dynamo", "roberta.torchscript", "distilbert.torchscript", "vit.torchscript",
           "vit.dynamo"]


def _outputs(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model if isinstance(model, Path) else model.SerializeToString()
    return list(graph.session(source).run(None, feeds))


def _norm_scales(model: onnx.ModelProto) -> list[np.ndarray]:
    constants = {t.name: t for t in model.graph.initializer}
    return [numpy_helper.to_array(constants[n.input[1]]) for n in model.graph.node if n.op_type == "LayerNormalization"]


@pytest.mark.parametrize("name", EXPORTS)
def test_smoothing_a_real_export_changes_its_weights_not_its_outputs(name: str, tmp_path: Path) -> None:
    model = tmp_path / f"{name}.onnx"
    normalize(exporter_models() / f"{name}.onnx", model, None)
    data = from_npz(exporter_models() / f"{name}.samples.npz", graph.io_info(model)[0])
    feeds = list(data.batches(4))
    proto = graph.load(model)
    scales_before = _norm_scales(proto)

    notes = smooth(proto, feeds, alpha=0.5)

    # Two blocks: each block's two LayerNorms before a projection (post-LN: the embeddings' LayerNorm and the
    # first block's output LayerNorm feed the next attention; the last one feeds only the output)
    assert notes["layer_norms"] == 4 and notes["matmuls_smoothed"] == 8
    if name.startswith("vit"):
        assert notes["restoring_muls"] == 0  # pre-LN: nothing but the projections reads a LayerNorm
    else:
        assert notes["restoring_muls"] == notes["layer_norms"]  # post-LN: the residual sum reads it too
    onnx.checker.check_model(proto)
    changed = [not np.allclose(a, b) for a, b in zip(scales_before, _norm_scales(proto), strict=True)]
    assert sum(changed) == notes["layer_norms"]
    for original, smoothed in zip(_outputs(model, feeds[0]), _outputs(proto, feeds[0]), strict=True):
        scale = max(float(np.abs(original).max()), 1.0)
        assert np.abs(original - smoothed).max() <= 2e-4 * scale


def _outlier_model(path: Path) -> tuple[Path, ModelData]:
    """LayerNorm -> MatMul -> Relu -> MatMul, with two LayerNorm channels 60x larger than the rest, as
    trained transformers have them."""
    rng = np.random.default_rng(0)
    width, hidden = 64, 128
    gamma = np.ones(width, np.float32)
    gamma[[3, 40]] = 60.0
    tensors = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(np.zeros(width, np.float32), "beta"),
               numpy_helper.from_array((rng.standard_normal((width, hidden)) / 8).astype(np.float32), "w1"),
               numpy_helper.from_array((rng.standard_normal((hidden, 8)) / 8).astype(np.float32), "w2")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["normed"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["normed", "w1"], ["h"], name="up"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="down")]
    model = helper.make_model(helper.make_graph(
        nodes, "outliers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], tensors),
        opset_imports=[helper.make_opsetid("", 17)])
    graph.save(model, path)
    return path, from_arrays({"x": rng.standard_normal((512, width)).astype(np.float32)}, graph.io_info(path)[0], None)


def test_smoothing_is_chosen_where_outlier_channels_cost_static_int8_its_fidelity(
    tmp_path: Path, make_ctx: MakeCtx,
) -> None:
    model, data = _outlier_model(tmp_path / "outliers.onnx")
    assert [len(s.matmuls) for s in sites(graph.load(model))] == [1]

    plain = quantize.run(model, tmp_path / "plain.onnx", QuantizeStep(mode="static", smoothing=None),
                         make_ctx(model, data))
    chosen = quantize.run(model, tmp_path / "auto.onnx", QuantizeStep(mode="static"), make_ctx(model, data))

    tried = chosen["calibration"]["candidates"]
    assert [c["method"] for c in tried[:3]] == ["minmax", "entropy", "percentile"]
    assert tried[3]["smoothing_alpha"] == 0.5 and tried[3]["method"] == chosen["calibration"]["method"]
    assert chosen["smoothing"] is not None and chosen["smoothing"]["layer_norms"] == 1
    assert chosen["smoothing"]["outlier_ratio_max"] > 10
    assert plain["smoothing"] is None and len(plain["calibration"]["candidates"]) == 3
    # Against the float model on held-out inputs, not only on the step's own measurement.
    held_out = {"x": np.random.default_rng(1).standard_normal((256, 64)).astype(np.float32)}
    reference = _outputs(model, held_out)[0]

    def error(path: Path) -> float:
        return float(np.linalg.norm(_outputs(path, held_out)[0] - reference) / np.linalg.norm(reference))

    assert error(tmp_path / "auto.onnx") < 0.8 * error(tmp_path / "plain.onnx")  # measured: 0.041 against 0.057


def test_a_fixed_calibration_and_alpha_are_used_as_given(tmp_path: Path, make_ctx: MakeCtx) -> None:
    model, data = _outlier_model(tmp_path / "outliers.onnx")
    notes = quantize.run(model, tmp_path / "out.onnx",
                         QuantizeStep(mode="static", calibration="minmax", smoothing=0.8), make_ctx(model, data))

    assert notes["calibration"]["method"] == "minmax"
    assert [(c["method"], c["smoothing_alpha"]) for c in notes["calibration"]["candidates"]] == [("minmax", 0.8)]
    assert notes["smoothing"]["alpha"] == 0.8


@pytest.mark.parametrize("alpha", [0.0, 1.0, 1.5, -0.2])
def test_smoothing_outside_zero_to_one_is_refused(alpha: float) -> None:
    with pytest.raises(ValidationError, match="between 0 and 1"):
        QuantizeStep(mode="static", smoothing=alpha)
