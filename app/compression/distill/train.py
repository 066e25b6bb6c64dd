"""Knowledge distillation: train a student (this recipe's model, or another upload) on the original's outputs.

The teacher is always the uploaded original, run with onnxruntime. The student is turned into a trainable torch
module by `distill.bridge`, trained with Adam on the teacher's outputs (soft targets for classifiers, a normalized
MSE for anything else), early-stopped on a held-out slice of the training data, and written back into its own
graph: the exported model has exactly the student's structure, only its weights change.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from app.compression import graph
from app.compression.config import DistillStep
from app.compression.context import StepContext
from app.compression.data import ModelData, feeds_per_batch
from app.compression.distill.bridge.module import OnnxModule, write_back
from app.compression.errors import CompressionError, DataRequired, InvalidRecipe, StepFailed, UnsupportedModel
from app.compression.evaluate import FEATURE_NAMES
from app.compression.normalize import lift_constants, resolve_identities
from app.compression.prune.transformer import Block, find_blocks
from app.compression.scoring import session_exposing

Tensor = torch.Tensor

VALIDATION_FRACTION = 0.15
DEFAULT_LR, TRANSFORMER_LR = 1e-3, 1e-4
DEFAULT_EPOCHS, TRANSFORMER_EPOCHS = 50, 8
_EVAL_BATCH = 256
_VERIFY_SAMPLES = 256
_REPORT_EVERY_S = 1.0
_SETUP_SHARE, _TRAIN_SHARE = 0.05, 0.9  # of this step's progress; the rest is export and checks
_EXPORT_TOLERANCE = 1e-3  # relative to the output's largest magnitude
_HALF_EXPORT_TOLERANCE = 3e-2
# 2-D float outputs are taken for class scores unless their name says they are features.


@dataclass(frozen=True)
class _Target:
    index: int
    """Position among the graph outputs."""
    name: str
    kind: Literal["kd", "mse"]
    student_probs: bool
    """The student's output is a Softmax: its log stands in for logits."""
    scale: float
    """MSE normalizer: the teacher output's mean square, so losses of different outputs are comparable."""


@dataclass
class _Run:
    """What training needs, with the train/validation split already applied."""

    targets: list[_Target]
    train_inputs: dict[str, Tensor]
    train_teacher: list[Tensor]
    train_labels: Tensor | None
    val_inputs: dict[str, Tensor]
    val_teacher: list[Tensor]
    val_labels: Tensor | None
    temperature: float
    alpha: float


@dataclass
class _History:
    train_loss: list[float | None] = field(default_factory=list)
    validation_loss: list[float | None] = field(default_factory=list)
    best_epoch: int = 0
    diverged: bool = False


def run(model: Path, output: Path, step: DistillStep, ctx: StepContext) -> dict[str, Any]:
    started = time.perf_counter()
    if ctx.train is None or len(ctx.train) < 2:
        raise DataRequired("distillation needs a dataset: the student learns from the original's outputs on real "
                           "inputs; upload one for this model (POST /models/{name}/datasets)")
    student_path, source = _resolve_student(model, step, ctx)
    _check_interface(ctx.original, student_path, source)
    student = graph.load(student_path)
    module = OnnxModule(student)  # UnsupportedModel names every op the bridge cannot run
    parameters = module.onnx_parameters()
    if not parameters:
        raise UnsupportedModel("the student has no float weights to train")
    ctx.progress(0.0, "teacher outputs")
    teacher_outputs = _teacher_outputs(ctx.original, ctx.train, ctx.threads)
    teacher_model = graph.load(ctx.original)
    prepared, loss_notes = _prepare(teacher_outputs, teacher_model, student, ctx.train, step, ctx.seed)
    student_blocks = _blocks(student)
    lr = step.lr or (TRANSFORMER_LR if student_blocks else DEFAULT_LR)
    epochs = step.epochs or (TRANSFORMER_EPOCHS if student_blocks else DEFAULT_EPOCHS)
    hidden = _hidden(teacher_model, student, student_blocks, ctx.threads) if step.hidden_states else None
    inputs, _ = graph.io_info(student)
    batch = step.batch_size if feeds_per_batch(inputs) is None else 1  # fixed-batch graphs take one row
    with _torch_settings(ctx.threads, ctx.seed):
        before = _evaluate(module, prepared, batch)
        history = _train(module, prepared, step, ctx, batch, before[0], lr, epochs, hidden)
        after = _evaluate(module, prepared, batch)
    ctx.progress(_SETUP_SHARE + _TRAIN_SHARE, "export")
    graph.save(write_back(student, module), output)
    half = any(t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16) for t in student.graph.initializer)
    # the module computes half-precision graphs in float32, so their export differs by fp16 rounding. A QDQ graph
    # runs on onnxruntime's integer kernels, whose requantized sums differ from fake quantization by steps that
    # add up over a transformer's layers (0.11 on all-MiniLM-L6-v2's unit-norm embeddings): the difference is
    # reported, and what counts is the fidelity measured on onnxruntime afterwards.
    fake_quantized = any(n.op_type == "QuantizeLinear" for n in student.graph.node)
    tolerance = math.inf if fake_quantized else _HALF_EXPORT_TOLERANCE if half else _EXPORT_TOLERANCE
    export_diff = _verify_export(output, module, prepared.val_inputs, ctx.threads, tolerance)
    graph.check_step_output(ctx.original, output, "distill")
    ctx.progress(1.0, "done")
    primary = prepared.targets[0]
    return {
        "student": source,
        "epochs_requested": epochs,
        "epochs_run": len(history.train_loss),
        "best_epoch": history.best_epoch,
        "stopped_early": len(history.train_loss) < epochs and not history.diverged,
        "diverged": history.diverged,
        "train_loss": history.train_loss,
        "validation_loss_before": _round(before[0]),
        "validation_loss": history.validation_loss,
        "agreement_metric": "top1" if primary.kind == "kd" else "cosine",
        "agreement_output": primary.name,
        "validation_agreement_before": _round(before[1]),
        "validation_agreement_after": _round(after[1]),
        **loss_notes,
        "temperature": step.temperature,
        "lr": lr,
        "hidden_states": hidden.names if hidden is not None else [],
        "batch_size": batch,
        "samples": {"train": len(next(iter(prepared.train_inputs.values()))),
                    "validation": len(next(iter(prepared.val_inputs.values())))},
        "trainable_tensors": len(parameters),
        "trainable_parameters": int(sum(p.numel() for p in parameters.values())),
        "batchnorm_statistics": "frozen" if "BatchNormalization" in module.op_counts() else None,
        "op_coverage": module.op_counts(),
        "export_max_abs_diff": float(export_diff),
        "seconds": round(time.perf_counter() - started, 3),
    }


# ---- student and data --------------------------------------------------------------------------------------------

def _resolve_student(model: Path, step: DistillStep, ctx: StepContext) -> tuple[Path, str]:
    if step.student == "current":
        return model, "current"
    if ctx.resolve_model is None:
        raise InvalidRecipe(f"student '{step.student}': other uploaded models cannot be looked up here; "
                            "use student 'current'")
    try:
        path: Path | None = ctx.resolve_model(step.student)
    except CompressionError:
        raise
    except Exception as exc:  # the resolver's own not-found error: the recipe names a model that is not there
        raise InvalidRecipe(f"student '{step.student}' is not an uploaded model") from exc
    if path is None or not Path(path).is_file():
        raise InvalidRecipe(f"student '{step.student}' is not an uploaded model")
    return Path(path), step.student


def _check_interface(teacher: Path, student: Path, name: str) -> None:
    """The distilled model replaces the original, so the student must take and give the same tensors."""
    want, got = graph.io_info(teacher), graph.io_info(student)
    for kind, expected, actual in (("inputs", want[0], got[0]), ("outputs", want[1], got[1])):
        if [(t.name, t.dtype) for t in expected] != [(t.name, t.dtype) for t in actual]:
            raise InvalidRecipe(f"student '{name}' has {kind} {graph.describe_tensors(actual)}, the original "
                                f"{graph.describe_tensors(expected)}: a student needs the original's inputs, outputs")
        for e, a in zip(expected, actual, strict=True):
            if len(e.shape) != len(a.shape) or any(x is not None and y is not None and x != y
                                                   for x, y in zip(e.shape, a.shape, strict=True)):
                raise InvalidRecipe(f"student '{name}': {kind[:-1]} '{e.name}' has shape {a.shape}, "
                                    f"the original {e.shape}")


def _teacher_outputs(original: Path, data: ModelData, threads: int) -> list[np.ndarray]:
    inputs, _ = graph.io_info(original)
    teacher = graph.session(original, threads)
    chunks = [teacher.run(None, feeds) for feeds in data.batches(feeds_per_batch(inputs) or _EVAL_BATCH)]
    return [np.concatenate([np.asarray(chunk[i]) for chunk in chunks]) for i in range(len(chunks[0]))]


def _producers(model: onnx.ModelProto) -> dict[str, str]:
    return {name: node.op_type for node in model.graph.node for name in node.output}


def _prepare(teacher: list[np.ndarray], teacher_model: onnx.ModelProto, student_model: onnx.ModelProto,
             data: ModelData, step: DistillStep, seed: int) -> tuple[_Run, dict[str, Any]]:
    """Loss per output, soft targets as logits, labels if usable, and the seeded train/validation split."""
    names = [v.name for v in teacher_model.graph.output]
    teacher_ops, student_ops = _producers(teacher_model), _producers(student_model)
    labels = data.labels
    label_note = "the dataset has no labels"
    if labels is not None:
        label_note = "labels must be one integer class per sample"
        labels = labels if labels.ndim == 1 and labels.dtype.kind in "iu" else None
    targets: list[_Target] = []
    soft: list[np.ndarray] = []
    losses: dict[str, str] = {}
    ignored: list[str] = []
    for index, (name, array) in enumerate(zip(names, teacher, strict=True)):
        if array.dtype.kind != "f":
            ignored.append(name)  # integer outputs (argmax, ids) carry no gradient
            continue
        array = array.astype(np.float32)
        producer = teacher_ops.get(name)
        probabilistic = producer in ("Softmax", "LogSoftmax")
        fits_labels = labels is not None and array.ndim == 2 and 0 <= labels.min() and labels.max() < array.shape[1]
        classifier = array.ndim == 2 and array.shape[1] > 1 and (
            probabilistic or fits_labels or not FEATURE_NAMES.search(name))
        if classifier:
            logits = np.log(np.clip(array, 1e-12, None)) if producer == "Softmax" else array
            targets.append(_Target(index, name, "kd", student_ops.get(name) == "Softmax", 1.0))
            soft.append(logits)
        else:
            scale = float(np.mean(np.square(array, dtype=np.float64))) + 1e-12
            targets.append(_Target(index, name, "mse", False, scale))
            soft.append(array)
    if not targets:
        raise UnsupportedModel("the model has no float outputs to distill on")
    kd = [t for t in targets if t.kind == "kd"]
    if labels is not None and not (kd and 0 <= labels.min() and labels.max() < teacher[kd[0].index].shape[1]):
        labels, label_note = None, "labels do not index the first classifier output's classes"
    # order matters for the notes' agreement: classifiers first, then the rest in graph order
    order = sorted(range(len(targets)), key=lambda i: targets[i].kind != "kd")
    targets, soft = [targets[i] for i in order], [soft[i] for i in order]
    for target in targets:
        losses[target.name] = ("kd+ce" if labels is not None and target is kd[0] else "kd") \
            if target.kind == "kd" else "mse"
    train_rows, val_rows = _split(len(data), seed)
    as_tensor: dict[str, Tensor] = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in data.inputs.items()}
    label_tensor = torch.from_numpy(labels.astype(np.int64)) if labels is not None else None
    prepared = _Run(
        targets=targets,
        train_inputs={k: v[train_rows] for k, v in as_tensor.items()},
        train_teacher=[torch.from_numpy(s[train_rows.numpy()]) for s in soft],
        train_labels=label_tensor[train_rows] if label_tensor is not None else None,
        val_inputs={k: v[val_rows] for k, v in as_tensor.items()},
        val_teacher=[torch.from_numpy(s[val_rows.numpy()]) for s in soft],
        val_labels=label_tensor[val_rows] if label_tensor is not None else None,
        temperature=step.temperature,
        alpha=step.alpha if labels is not None else 1.0,
    )
    notes: dict[str, Any] = {"losses": losses, "labels_used": labels is not None, "alpha": prepared.alpha}
    if labels is None:
        notes["labels_note"] = label_note
    if ignored:
        notes["ignored_outputs"] = ignored
    return prepared, notes


@dataclass
class _Hidden:
    """The teacher's residual stream after the blocks the student kept, matched by name, computed per batch."""

    names: list[str]
    teacher: Any  # onnxruntime session answering `names`
    scales: list[float] = field(default_factory=list)

    def targets(self, feeds: dict[str, Tensor]) -> list[Tensor]:
        values = self.teacher.run(self.names, {k: v.numpy() for k, v in feeds.items()})
        if not self.scales:  # each stream's mean square on the first batch: losses of equal weight
            self.scales = [float(np.mean(np.square(v, dtype=np.float64))) + 1e-12 for v in values]
        return [torch.from_numpy(np.asarray(v, dtype=np.float32)) for v in values]


def _blocks(model: onnx.ModelProto) -> list[Block] | None:
    """The model's encoder blocks, or None when it is not a transformer whose blocks can be found."""
    try:
        return find_blocks(model)
    except UnsupportedModel:
        return None


def _hidden(teacher: onnx.ModelProto, student: onnx.ModelProto, student_blocks: list[Block] | None,
            threads: int) -> _Hidden | None:
    if not student_blocks:
        return None  # not a transformer this can match block by block: outputs only
    structure = onnx.ModelProto()
    structure.CopyFrom(teacher)
    lift_constants(structure)  # as the student saw it after normalization: weights found behind Identity too
    resolve_identities(structure)
    teacher_blocks = _blocks(structure)
    if teacher_blocks is None:
        return None
    teacher_ends = {b.end for b in teacher_blocks}
    outputs = {v.name for v in student.graph.output}
    names = [b.end for b in student_blocks if b.end in teacher_ends and b.end not in outputs]
    return _Hidden(names, session_exposing(teacher, names, threads)) if names else None


def _split(count: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded (train rows, validation rows); early stopping never looks at rows it trained on."""
    order = np.random.default_rng(seed).permutation(count)
    held = min(max(int(round(count * VALIDATION_FRACTION)), 1), count - 1)
    return torch.from_numpy(np.sort(order[held:])), torch.from_numpy(np.sort(order[:held]))


# ---- training ----------------------------------------------------------------------------------------------------

def _loss(outputs: tuple[Tensor, ...], teacher: list[Tensor], labels: Tensor | None, run_: _Run) -> Tensor:
    total = torch.zeros(())
    for target, soft in zip(run_.targets, teacher, strict=True):
        student = outputs[target.index].float()
        if target.kind == "mse":
            total = total + F.mse_loss(student, soft) / target.scale
            continue
        if target.student_probs:
            student = torch.log(student.clamp_min(1e-12))
        t = run_.temperature
        kd = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(soft / t, -1), reduction="batchmean",
                      log_target=True) * (t * t)  # T^2 keeps soft-target gradients on the hard-label scale
        if labels is not None and target is run_.targets[0]:
            kd = run_.alpha * kd + (1 - run_.alpha) * F.cross_entropy(student, labels)
        total = total + kd
    return total / len(run_.targets)


def _agreement(outputs: Tensor, soft: Tensor, target: _Target) -> float:
    if target.kind == "kd":
        return float((outputs.float().argmax(-1) == soft.argmax(-1)).float().mean())
    a, b = outputs.float().reshape(len(outputs), -1), soft.reshape(len(soft), -1)
    return float(F.cosine_similarity(a, b, dim=1, eps=1e-12).mean())


def _evaluate(module: OnnxModule, run_: _Run, batch: int) -> tuple[float, float]:
    """(validation loss, validation agreement of the first target with the teacher)."""
    rows = len(run_.val_teacher[0])
    size = max(batch, _EVAL_BATCH) if batch > 1 else 1
    chunks: list[tuple[Tensor, ...]] = []
    with torch.no_grad():
        for start in range(0, rows, size):
            chunks.append(module({k: v[start:start + size] for k, v in run_.val_inputs.items()}))
        outputs = tuple(torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0])))
        for target, soft in zip(run_.targets, run_.val_teacher, strict=True):
            if tuple(outputs[target.index].shape) != tuple(soft.shape):
                raise InvalidRecipe(f"the student's output '{target.name}' has shape "
                                    f"{tuple(outputs[target.index].shape)}, the original's {tuple(soft.shape)}")
        loss = float(_loss(outputs, run_.val_teacher, run_.val_labels, run_))
    return loss, _agreement(outputs[run_.targets[0].index], run_.val_teacher[0], run_.targets[0])


def _train(module: OnnxModule, run_: _Run, step: DistillStep, ctx: StepContext, batch: int,
           baseline: float, lr: float, epochs: int, hidden: _Hidden | None) -> _History:
    """Adam epochs with early stopping; the module ends holding the best-validation weights (maybe the start).

    With `hidden`, the training loss adds the normalized MSE of every matched residual stream (as TinyBERT's
    layer-wise distillation); early stopping still looks at the outputs alone, which is what is served."""
    parameters = module.onnx_parameters()
    optimizer = torch.optim.Adam(list(parameters.values()), lr=lr)
    names = list(module.output_names) + (hidden.names if hidden is not None else [])
    rng = np.random.default_rng(ctx.seed)
    rows = len(run_.train_teacher[0])
    steps_per_epoch = math.ceil(rows / batch)
    history = _History()
    best_loss, best = baseline, _snapshot(parameters)
    stale = 0
    last_report = time.monotonic()
    for epoch in range(1, epochs + 1):
        order = torch.from_numpy(rng.permutation(rows))
        total, seen = 0.0, 0
        for index, start in enumerate(range(0, rows, batch)):
            ctx.progress.cancel.check()
            pick = order[start:start + batch]
            feeds = {k: v[pick] for k, v in run_.train_inputs.items()}
            values = module.evaluate(feeds, names)
            outputs = tuple(values[n] for n in module.output_names)
            labels = run_.train_labels[pick] if run_.train_labels is not None else None
            loss = _loss(outputs, [t[pick] for t in run_.train_teacher], labels, run_)
            if hidden is not None:
                targets = hidden.targets(feeds)
                streams = [F.mse_loss(values[n].float(), t) / scale
                           for n, t, scale in zip(hidden.names, targets, hidden.scales, strict=True)]
                loss = loss + torch.stack(streams).mean()
            if not torch.isfinite(loss):
                history.diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            total, seen = total + float(loss.detach()) * len(pick), seen + len(pick)
            if time.monotonic() - last_report >= _REPORT_EVERY_S:  # long epochs still report (and can cancel)
                last_report = time.monotonic()
                ctx.progress(_fraction(epoch - 1 + (index + 1) / steps_per_epoch, epochs),
                             f"epoch {epoch}/{epochs}")
        if history.diverged:
            break
        validation, _ = _evaluate(module, run_, batch)
        history.train_loss.append(_round(total / max(seen, 1)))
        history.validation_loss.append(_round(validation))
        ctx.progress(_fraction(epoch, epochs), f"epoch {epoch}/{epochs}")
        last_report = time.monotonic()
        if math.isfinite(validation) and validation < best_loss - 1e-7 * max(1.0, abs(best_loss)):
            best_loss, best, history.best_epoch, stale = validation, _snapshot(parameters), epoch, 0
        else:
            stale += 1
            if stale >= step.patience:
                break
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(best[name])
    return history


def _snapshot(parameters: dict[str, torch.nn.Parameter]) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in parameters.items()}


def _fraction(epochs_done: float, epochs: int) -> float:
    return _SETUP_SHARE + _TRAIN_SHARE * epochs_done / epochs


@contextmanager
def _torch_settings(threads: int, seed: int) -> Iterator[None]:
    """Seeded and single-purpose: torch's thread count and RNG are process-wide, so both are restored after."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(max(threads, 1))
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deterministic.*")
            torch.manual_seed(seed)
            torch.use_deterministic_algorithms(True, warn_only=True)
            yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)


# ---- export check ------------------------------------------------------------------------------------------------

def _verify_export(path: Path, module: OnnxModule, inputs: dict[str, Tensor], threads: int,
                   tolerance: float) -> float:
    """The saved graph must compute what the trained module computes; returns the largest difference."""
    feeds = {k: v[:_VERIFY_SAMPLES].numpy() for k, v in inputs.items()}
    graph_inputs, _ = graph.io_info(path)
    rows = feeds_per_batch(graph_inputs) or _VERIFY_SAMPLES
    saved = graph.session(path, threads)
    worst = 0.0
    with torch.no_grad():
        for start in range(0, len(next(iter(feeds.values()))), rows):
            chunk = {k: v[start:start + rows] for k, v in feeds.items()}
            for want, got in zip(module(chunk), saved.run(None, chunk), strict=True):
                expected, actual = want.numpy().astype(np.float64), np.asarray(got, dtype=np.float64)
                diff = float(np.max(np.abs(expected - actual))) if expected.size else 0.0
                if diff > tolerance * max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0):
                    raise StepFailed(f"distill: the exported model differs from the trained one by {diff:.3g}")
                worst = max(worst, diff)
    return worst


def _round(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(value) else None  # JSON has no NaN
