from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from app.compression import graph
from app.compression.config import DistillStep
from app.compression.context import StepContext
from app.compression.data import ModelData
from app.compression.distill import run
from app.compression.errors import Cancelled, DataRequired, InvalidRecipe
from app.compression.progress import CancelToken, StepProgress
from tests.helpers import CNN, MLP, TRANSFORMER

MakeCtx = Callable[..., StepContext]


def _degraded(source: Path, target: Path, noise: float, names: set[str] | None = None, seed: int = 1) -> Path:
    """The source with Gaussian noise (scaled to each tensor's spread) on its matrices."""
    model = onnx.load(str(source))
    rng = np.random.default_rng(seed)
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.ndim == 2 and (names is None or tensor.name in names):
            noisy = array + rng.standard_normal(array.shape).astype(np.float32) * array.std() * noise
            tensor.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), tensor.name))
    onnx.save(model, str(target))
    return target


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_a_degraded_student_recovers_agreement(make_ctx: MakeCtx, mlp_data: ModelData, tmp_path: Path) -> None:
    student = _degraded(MLP, tmp_path / "student.onnx", noise=2.0, names={"net.0.weight", "net.2.weight"})
    ctx = make_ctx(MLP, train=mlp_data)
    ctx.resolve_model = {"noisy": student}.__getitem__
    output = tmp_path / "out.onnx"
    notes = run(MLP, output, DistillStep(student="noisy", epochs=20, lr=3e-3), ctx)

    assert notes["student"] == "noisy" and notes["labels_used"] is True and notes["losses"] == {"logits": "kd+ce"}
    assert notes["agreement_metric"] == "top1"
    assert notes["validation_agreement_before"] < 0.6
    assert notes["validation_agreement_after"] >= 0.9
    assert notes["validation_agreement_after"] - notes["validation_agreement_before"] >= 0.3
    assert notes["validation_loss"][notes["best_epoch"] - 1] < notes["validation_loss_before"]
    assert notes["samples"] == {"train": 382, "validation": 68}
    assert notes["export_max_abs_diff"] < 1e-3
    assert notes["op_coverage"] == {"Gemm": 3, "Relu": 2}
    json.dumps(notes, allow_nan=False)
    # the student's graph, retrained: same structure, new weights
    assert [n.op_type for n in onnx.load(str(output)).graph.node] == [n.op_type for n in onnx.load(str(MLP)).graph.node]
    assert not np.array_equal(_initializers(output)["net.0.weight"], _initializers(student)["net.0.weight"])
    feeds = {"input": mlp_data.inputs["input"]}
    teacher = graph.session(MLP).run(None, feeds)[0].argmax(1)
    assert np.mean(graph.session(output).run(None, feeds)[0].argmax(1) == teacher) >= 0.9


def test_current_model_without_labels_uses_soft_targets_only(make_ctx: MakeCtx, mlp_data: ModelData,
                                                             tmp_path: Path) -> None:
    student = _degraded(MLP, tmp_path / "student.onnx", noise=1.0)
    unlabeled = ModelData(mlp_data.inputs, None, "dataset")
    notes = run(student, tmp_path / "out.onnx", DistillStep(epochs=3, alpha=0.2), make_ctx(MLP, train=unlabeled))
    assert notes["student"] == "current" and notes["labels_used"] is False and notes["alpha"] == 1.0
    assert notes["losses"] == {"logits": "kd"} and "no labels" in notes["labels_note"]
    assert notes["validation_agreement_after"] >= notes["validation_agreement_before"]


def test_training_is_seeded(make_ctx: MakeCtx, mlp_data: ModelData, tmp_path: Path) -> None:
    student = _degraded(MLP, tmp_path / "student.onnx", noise=1.0)
    step = DistillStep(epochs=2, batch_size=32)
    run(student, tmp_path / "a.onnx", step, make_ctx(MLP, train=mlp_data, seed=3))
    run(student, tmp_path / "b.onnx", step, make_ctx(MLP, train=mlp_data, seed=3))
    first, second = _initializers(tmp_path / "a.onnx"), _initializers(tmp_path / "b.onnx")
    assert all(np.array_equal(first[name], second[name]) for name in first)


def test_a_cnn_trains_with_frozen_batchnorm_statistics(make_ctx: MakeCtx, cnn_data: ModelData,
                                                       tmp_path: Path) -> None:
    student = _degraded(CNN, tmp_path / "student.onnx", noise=0.5)
    output = tmp_path / "out.onnx"
    notes = run(student, output, DistillStep(epochs=1, lr=1e-3), make_ctx(CNN, train=cnn_data.take(200)))
    assert notes["batchnorm_statistics"] == "frozen" and notes["epochs_run"] == 1
    assert notes["op_coverage"]["Conv"] == 4 and notes["op_coverage"]["BatchNormalization"] == 4
    before, after = _initializers(student), _initializers(output)
    assert np.array_equal(before["features.1.running_mean"], after["features.1.running_mean"])
    assert notes["validation_agreement_after"] >= notes["validation_agreement_before"]


def test_the_transformer_distills_on_its_embedding(make_ctx: MakeCtx, transformer_data: ModelData,
                                                   tmp_path: Path) -> None:
    student = _degraded(TRANSFORMER, tmp_path / "student.onnx", noise=0.3,
                        names={"layers.0.ffn.0.weight.T", "layers.1.attn.qkv.weight.T", "head.weight"})
    notes = run(student, tmp_path / "out.onnx", DistillStep(epochs=2, batch_size=8, lr=1e-3),
                make_ctx(TRANSFORMER, train=transformer_data))
    assert notes["losses"] == {"embedding": "mse"} and notes["agreement_metric"] == "cosine"
    assert notes["labels_used"] is False
    assert notes["validation_agreement_after"] > notes["validation_agreement_before"]
    assert notes["export_max_abs_diff"] < 1e-3


def test_distillation_needs_data(make_ctx: MakeCtx, tmp_path: Path) -> None:
    with pytest.raises(DataRequired, match="distillation needs a dataset"):
        run(MLP, tmp_path / "out.onnx", DistillStep(), make_ctx(MLP, train=None))


@pytest.mark.parametrize("other", [TRANSFORMER, CNN], ids=["other-names", "other-rank"])
def test_a_student_with_other_inputs_is_refused(make_ctx: MakeCtx, mlp_data: ModelData, tmp_path: Path,
                                                other: Path) -> None:
    ctx = make_ctx(MLP, train=mlp_data)
    ctx.resolve_model = lambda _name: other
    with pytest.raises(InvalidRecipe, match="student 'other'"):
        run(MLP, tmp_path / "out.onnx", DistillStep(student="other"), ctx)


def test_an_unknown_student_is_refused(make_ctx: MakeCtx, mlp_data: ModelData, tmp_path: Path) -> None:
    ctx = make_ctx(MLP, train=mlp_data)
    with pytest.raises(InvalidRecipe, match="cannot be looked up"):
        run(MLP, tmp_path / "out.onnx", DistillStep(student="ghost"), ctx)
    uploads: dict[str, Path] = {}
    ctx.resolve_model = uploads.__getitem__
    with pytest.raises(InvalidRecipe, match="'ghost' is not an uploaded model"):
        run(MLP, tmp_path / "out.onnx", DistillStep(student="ghost"), ctx)


def test_cancelling_from_the_progress_callback_stops_training(make_ctx: MakeCtx, mlp_data: ModelData,
                                                              tmp_path: Path) -> None:
    token = CancelToken()
    stages: list[str] = []

    def report(_fraction: float, stage: str) -> None:
        stages.append(stage)
        if "epoch 1/" in stage:
            token.cancel()

    ctx = make_ctx(MLP, train=mlp_data)
    ctx.progress = StepProgress(report, 0.0, 1.0, "distill", token)
    output = tmp_path / "out.onnx"
    with pytest.raises(Cancelled):
        run(MLP, output, DistillStep(epochs=50), ctx)
    assert not output.exists()
    assert not any("epoch 2/" in s for s in stages)
