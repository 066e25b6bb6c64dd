"""Conversion jobs: a PyTorch upload becomes its model's original ONNX variant, checked against PyTorch."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.compression import preflight
from app.compression.errors import Cancelled, CompressionError
from app.errors import SlimServeError
from app.formats import datasets as dataset_format
from app.formats.onnx_model import inspect_onnx
from app.formats.torch_archive import SUFFIXES
from app.services.models import CONVERTING, DATASET_SUFFIX, MODEL_SUFFIX, ORIGINAL, dataset_row
from app.storage.artifacts import ArtifactStore
from app.storage.db import rowcount, transaction
from app.storage.tables import JobRow, ModelRow, VariantRow, utcnow

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


class ConversionRunner:
    def __init__(self, *, session_factory: sessionmaker[Session], store: ArtifactStore, me: str,
                 enqueue: Callable[[str], None] | None) -> None:
        self._factory = session_factory
        self._store = store
        self._me = me
        # Where a job started here (a compression after a conversion) is published; None: the embedded
        # scheduler finds queued jobs in the database by itself.
        self._enqueue = enqueue

    def run(self, job: JobRow, output: Path, progress: Progress, pin: Callable[[Path], Path]) -> str:
        """Turn the uploaded PyTorch file into the model's original ONNX variant, checked against PyTorch."""
        from app.formats.torch_convert import convert

        with self._factory() as session:
            model = session.get(ModelRow, job.model_id) if job.model_id is not None else None
            if model is None:
                raise CompressionError(f"model '{job.model_name}' was deleted before its conversion ran")
            conversion = dict((model.config or {}).get("conversion") or {})
            source = pin(self._store.local(model.sha256, SUFFIXES[model.format]))
            samples_sha = conversion.get("samples_sha256")
            samples_path = pin(self._store.local(samples_sha, DATASET_SUFFIX)) if samples_sha else None
            kind = model.format
            label = f"'{conversion['filename']}'" if conversion.get("filename") else "the model file"
        samples = dataset_format.read_arrays(samples_path, display_name="the samples") if samples_path else None
        result = convert(source, kind, output, label=label, samples=samples,
                         input_shapes=conversion.get("input_shapes"), progress=progress)
        progress(0.95, "checking the ONNX model")
        info, session_ort = inspect_onnx(output, display_name=f"the ONNX model converted from {label}",
                                         providers=["CPUExecutionProvider"])
        model_profile = preflight.profile(output, runner=session_ort)
        del session_ort
        dataset = dataset_format.check_dataset(samples, info.inputs, display_name="the samples") \
            if samples is not None else None
        sha, size, _ = self._store.adopt(output, MODEL_SUFFIX)
        with transaction(self._factory) as session:
            owned = rowcount(session.execute(
                update(JobRow).where(JobRow.id == job.id, JobRow.worker == self._me, JobRow.state == "running",
                                     JobRow.cancel_requested.is_(False))
                .values(state="succeeded", progress=1.0, stage="done", finished_at=utcnow(), error=None,
                        report={"conversion": result.to_json()})
            ))
            model = session.get(ModelRow, job.model_id)
            if not owned or model is None or model.state != CONVERTING:
                raise Cancelled("the conversion was cancelled, taken over or its model deleted")
            model.state = "ready"
            model.inputs = [s.to_json() for s in info.inputs]
            model.outputs = [s.to_json() for s in info.outputs]
            model.opset, model.parameters = info.opset, info.parameters
            model.warnings = list(model.warnings or []) + result.warnings
            conversion.update(state="succeeded", **result.to_json())
            model.config = {**(model.config or {}), "conversion": conversion, "profile": model_profile}
            model.variants.append(VariantRow(name=ORIGINAL, recipe=None, parent=None, sha256=sha, size_bytes=size,
                                             report=None))
            if dataset is not None and samples_sha and samples_path is not None:
                model.datasets.append(dataset_row("samples", samples_sha, samples_path.stat().st_size, dataset))
        log.info("converted %s from %s: max abs error %.3g over %d rows", job.model_name, kind,
                 result.max_abs_error, result.rows_checked)
        return "succeeded"

    def start_requested_compression(self, job: JobRow) -> None:
        """An upload with `compress` of a PyTorch file: the compression starts once the model exists as ONNX."""
        from app.services.jobs import JobService

        with self._factory() as session:
            model = session.get(ModelRow, job.model_id) if job.model_id is not None else None
            after = ((model.config or {}).get("conversion") or {}).get("after") if model else None
        if not after or model is None:
            return
        service = JobService(session_factory=self._factory, enqueue=self._enqueue or (lambda _job_id: None))
        try:
            service.create(model_name=model.name, recipe=after["recipe"], promote=bool(after.get("promote")))
        except SlimServeError as exc:
            with transaction(self._factory) as session:
                row = session.get(ModelRow, model.id)
                if row is not None:
                    row.warnings = [*row.warnings, f"the compression asked for at upload did not start: {exc}"]


def mark_model_failed(session: Session, model_id: int, error: str) -> None:
    """A conversion job that failed or was cancelled leaves its model failed, with the reason."""
    model = session.get(ModelRow, model_id)
    if model is None or model.state != CONVERTING:
        return
    model.state = "failed"
    conversion = dict((model.config or {}).get("conversion") or {})
    conversion.update(state="failed", error=error)
    model.config = {**(model.config or {}), "conversion": conversion}
