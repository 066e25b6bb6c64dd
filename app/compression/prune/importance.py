"""How much each output channel matters (L1, L2, first-order Taylor), and the quick measurements pruning reports."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from app.compression import graph
from app.compression.data import ModelData, feeds_per_batch
from app.compression.errors import InvalidRecipe
from app.compression.prune.deps import Producer

TAYLOR_SAMPLES = 256
_TAYLOR_BATCH = 64
_LATENCY_RUNS = 30
_LATENCY_SECONDS = 2.0


def norms(producers: list[Producer], weights: dict[str, np.ndarray], kind: str) -> list[np.ndarray]:
    """L1 or L2 norm of each output channel's weights."""
    result = []
    for producer in producers:
        weight = np.moveaxis(weights[producer.weight].astype(np.float64), producer.out_axis, 0)
        rows = weight.reshape(weight.shape[0], -1)
        result.append(np.abs(rows).sum(axis=1) if kind == "l1" else np.sqrt((rows**2).sum(axis=1)))
    return result


def usable_labels(labels: np.ndarray | None, classes: int) -> bool:
    return labels is not None and labels.ndim == 1 and labels.dtype.kind in "iu" and labels.size > 0 \
        and int(labels.min()) >= 0 and int(labels.max()) < classes


def taylor(model: onnx.ModelProto, producers: list[Producer], data: ModelData,
           progress: Callable[[float, str], None]) -> list[np.ndarray]:
    """First-order Taylor importance: per sample |sum over a channel's positions of activation x gradient|, summed.

    The loss is cross-entropy against the labels for a classifier with labels, against its own top-1 without
    them, and half the squared output norm for any other model. Gradients come from the torch bridge.
    """
    try:
        import torch
        from torch.nn import functional

        from app.compression.distill.bridge.module import OnnxModule
        module = OnnxModule(model, trainable={p.weight for p in producers})
    except Exception as exc:
        raise InvalidRecipe(f"importance 'taylor' needs gradients, and the training bridge cannot run this model "
                            f"({str(exc)[:200]}); use importance 'l1' or 'l2'") from None
    names = [*module.output_names, *(p.output for p in producers)]
    totals = [np.zeros(len(p.layout.atoms)) for p in producers]
    sample = data.take(TAYLOR_SAMPLES)
    for start in range(0, len(sample), _TAYLOR_BATCH):
        progress(start / len(sample), "taylor importance")
        batch = sample.subset(np.arange(start, min(start + _TAYLOR_BATCH, len(sample))))
        values = module.evaluate(batch.inputs, names)
        activations = [values[p.output] for p in producers]
        if not all(a.requires_grad for a in activations):
            raise InvalidRecipe("importance 'taylor': a pruned layer's output does not depend on its weights here; "
                                "use importance 'l1' or 'l2'")
        for activation in activations:
            activation.retain_grad()  # keep the gradient of this intermediate after backward
        logits = values[module.output_names[0]]
        if logits.ndim == 2 and logits.shape[1] > 1 and logits.is_floating_point():
            labels = batch.labels
            target = torch.from_numpy(labels.astype(np.int64)) if labels is not None and usable_labels(
                labels, logits.shape[1]) else logits.argmax(dim=1).detach()
            loss = functional.cross_entropy(logits.float(), target, reduction="sum")
        else:
            loss = sum((0.5 * values[n].float().pow(2).sum() for n in module.output_names
                        if values[n].is_floating_point()), torch.zeros(()))
        module.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        with torch.no_grad():
            for index, (producer, activation) in enumerate(zip(producers, activations, strict=True)):
                gradient = activation.grad if activation.grad is not None else torch.zeros_like(activation)
                product = (activation * gradient).movedim(activation.ndim + producer.layout.axis, -1)
                rows = product.reshape(product.shape[0] if product.ndim > 1 else 1, -1, product.shape[-1])
                totals[index] += rows.sum(dim=1).abs().sum(dim=0).double().numpy()
    return totals


def top1_accuracy(path: Path, data: ModelData | None, threads: int) -> float | None:
    """Top-1 accuracy of a classifier on labelled data; None when that does not apply."""
    if data is None or data.labels is None or len(data) == 0:
        return None
    session = graph.session(path, threads)
    inputs, _ = graph.io_info(path)
    outputs = [session.run(None, feeds)[0] for feeds in data.batches(feeds_per_batch(inputs) or 256)]
    logits = np.concatenate(outputs)
    if logits.ndim != 2 or logits.shape[1] < 2 or not usable_labels(data.labels, logits.shape[1]):
        return None
    return round(float(np.mean(logits.argmax(axis=1) == data.labels)), 4)


def latency(original: Path, pruned: Path, data: ModelData, threads: int) -> dict[str, Any]:
    """Median ms per call of both models on one batch, calls alternated so machine noise hits both alike."""
    inputs, _ = graph.io_info(original)
    rows = min(feeds_per_batch(inputs) or 32, len(data))
    feeds = next(data.take(rows).batches(rows))
    sessions = graph.session(original, threads), graph.session(pruned, threads)
    times: tuple[list[float], list[float]] = ([], [])
    began = time.perf_counter()
    for run in range(_LATENCY_RUNS + 5):
        for index, session in enumerate(sessions):
            started = time.perf_counter()
            session.run(None, feeds)
            if run >= 5:  # the first calls warm up
                times[index].append((time.perf_counter() - started) * 1e3)
        if run >= 10 and time.perf_counter() - began > _LATENCY_SECONDS:
            break  # a large model: fewer runs are enough for a median
    before, after = float(np.median(times[0])), float(np.median(times[1]))
    return {"batch": rows, "original_ms": round(before, 4), "pruned_ms": round(after, 4),
            "ratio": round(after / before, 3) if before > 0 else None}
