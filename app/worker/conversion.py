"""Conversion jobs: a PyTorch, Keras or Hugging Face upload becomes its model's original ONNX variant, checked
against the framework it came from."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.compression import preflight
from app.compression.errors import Cancelled, CompressionError
from app.errors import SlimServeError
from app.formats import datasets as dataset_format
from app.formats.huggingface import GENERATION, HuggingFaceFolder
from app.formats.keras_file import KERAS, KERAS_H5
from app.formats.onnx_model import OnnxInfo, inspect_onnx
from app.runtime.datatypes import TensorSpec
from app.services.models import (
    CONVERTING,
    DATASET_SUFFIX,
    HF_FOLDER,
    HUGGINGFACE,
    MODEL_SUFFIX,
    ORIGINAL,
    SOURCE_SUFFIXES,
    commit_onnx,
    dataset_row,
)
from app.services.text import TOKENIZER_SUFFIX, generation_interface, text_interface
from app.storage.artifacts import MODEL_FOLDER, ArtifactStore
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
            if model.format == HUGGINGFACE:
                return self._run_huggingface(job, model, progress)
            conversion = dict((model.config or {}).get("conversion") or {})
            source = pin(self._store.local(model.sha256, SOURCE_SUFFIXES[model.format]))
            samples_sha = conversion.get("samples_sha256")
            samples_path = pin(self._store.local(samples_sha, DATASET_SUFFIX)) if samples_sha else None
            kind = model.format
            label = f"'{conversion['filename']}'" if conversion.get("filename") else "the model file"
        samples = dataset_format.read_arrays(samples_path, display_name="the samples") if samples_path else None
        if kind in (KERAS, KERAS_H5):
            from app.formats import keras_convert

            result = keras_convert.convert(source, kind, output, label=label, samples=samples_path,
                                           progress=progress)
        else:
            result = convert(source, kind, output, label=label, samples=samples,
                             input_shapes=conversion.get("input_shapes"), progress=progress)
        progress(0.95, "checking the ONNX model")
        info, session_ort = inspect_onnx(output, display_name=f"the ONNX model converted from {label}",
                                         providers=["CPUExecutionProvider"])
        model_profile = preflight.profile(output, runner=session_ort)
        del session_ort
        if samples is not None:  # arrays that fixed a scalar argument of forward() are no input of the ONNX model
            kept = {spec.name for spec in info.inputs} | {dataset_format.LABELS}
            samples = {name: array for name, array in samples.items() if name in kept}
        dataset = dataset_format.check_dataset(samples, info.inputs, display_name="the samples") \
            if samples else None
        sha, size, _ = self._store.adopt(output, MODEL_SUFFIX)
        with transaction(self._factory) as session:
            model = self._publish(session, job, result.to_json(), info, info.inputs, info.outputs, result.warnings)
            conversion.update(state="succeeded", **result.to_json())
            model.config = {**(model.config or {}), "conversion": conversion, "profile": model_profile}
            model.variants.append(VariantRow(name=ORIGINAL, recipe=None, parent=None, sha256=sha, size_bytes=size,
                                             report=None))
            if dataset is not None and samples_sha and samples_path is not None:
                model.datasets.append(dataset_row("samples", samples_sha, samples_path.stat().st_size, dataset))
        log.info("converted %s from %s: max abs error %.3g over %d rows", job.model_name, kind,
                 result.max_abs_error, result.rows_checked)
        return "succeeded"

    def _run_huggingface(self, job: JobRow, model: ModelRow, progress: Progress) -> str:
        """A Hugging Face folder -> ONNX with its task's head, a tokenizer.json, and the text interface."""
        from app.formats.hf_convert import convert

        summary = HuggingFaceFolder.from_json(dict(model.config["huggingface"]))
        conversion = dict((model.config or {}).get("conversion") or {})
        label = f"'{conversion['filename']}'" if conversion.get("filename") else "the folder"
        source = self._store.local_folder(model.sha256, HF_FOLDER)
        if summary.task == GENERATION:
            return self._run_generation(job, summary, source, label, conversion, progress)
        work = self._store.temp_path(".convert")
        try:
            result = convert(source, summary, work, label=label, progress=progress)
            progress(0.9, "checking the ONNX model")
            info, session_ort = inspect_onnx(result.onnx, display_name=f"the ONNX model converted from {label}",
                                             providers=["CPUExecutionProvider"], folder=work)
            model_profile = preflight.profile(result.onnx, runner=session_ort, load_weights=not result.external_data)
            del session_ort
            tokenizer_sha = self._store.adopt(result.tokenizer, TOKENIZER_SUFFIX)[0] if result.tokenizer else None
            sha, size, files = commit_onnx(self._store, result.onnx, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        settings = result.settings.to_json()
        text = None if summary.image else {**settings, "tokenizer_sha256": tokenizer_sha}
        inputs, outputs = (info.inputs, info.outputs) if text is None else text_interface(settings)
        with transaction(self._factory) as session:
            row = self._publish(session, job, result.to_json(), info, inputs, outputs, result.warnings)
            conversion.update(state="succeeded", **result.to_json())
            config = {**(row.config or {}), "conversion": conversion, "profile": model_profile, "files": files,
                      "onnx_inputs": [s.to_json() for s in info.inputs],
                      "onnx_outputs": [s.to_json() for s in info.outputs]}
            if text is not None:
                config["text"] = text
            else:
                config["image"] = settings["image"]
            row.config = config
            row.variants.append(VariantRow(name=ORIGINAL, recipe=None, parent=None, sha256=sha, size_bytes=size,
                                           report=None))
        log.info("converted %s (%s, %s): max abs error %.3g", job.model_name, summary.architecture, summary.task,
                 result.max_abs_error)
        return "succeeded"

    def _run_generation(self, job: JobRow, summary: HuggingFaceFolder, source: Path, label: str,
                        conversion: dict[str, Any], progress: Progress) -> str:
        """A causal LM -> an onnxruntime-genai folder (fp32), checked against transformers; served by generation."""
        from app.formats import genai_build

        work = self._store.temp_path(".genai")
        try:
            check = genai_build.convert(source, summary, work, label=label, progress=progress)
            opset, parameters, built = genai_build.describe(work)
            sha, size, _ = self._store.commit_folder(work, MODEL_FOLDER)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        generation = {**(summary.generation or {}), **built, "architecture": summary.architecture}
        inputs, outputs = generation_interface()
        info = OnnxInfo(inputs=inputs, outputs=outputs, opset=opset, parameters=parameters)
        warnings = [] if check.tokenizer_match else [
            "onnxruntime-genai's tokenizer splits some check texts differently from transformers'"]
        with transaction(self._factory) as session:
            row = self._publish(session, job, check.to_json(), info, inputs, outputs, warnings)
            conversion.update(state="succeeded", **check.to_json())
            row.config = {**(row.config or {}), "conversion": conversion, "generation": generation}
            row.variants.append(VariantRow(name=ORIGINAL, recipe=None, parent=None, sha256=sha, size_bytes=size,
                                           report=None))
        log.info("converted %s (%s, generation): max abs error %.3g, greedy %s", job.model_name,
                 summary.architecture, check.max_abs_error, "matches" if check.greedy_match else "differs")
        return "succeeded"

    def _publish(self, session: Session, job: JobRow, report: dict[str, Any], info: OnnxInfo,
                 inputs: list[TensorSpec], outputs: list[TensorSpec], warnings: list[str]) -> ModelRow:
        """The job succeeded and its model is ready with this interface, if this worker still owns the job."""
        owned = rowcount(session.execute(
            update(JobRow).where(JobRow.id == job.id, JobRow.worker == self._me, JobRow.state == "running",
                                 JobRow.cancel_requested.is_(False))
            .values(state="succeeded", progress=1.0, stage="done", finished_at=utcnow(), error=None,
                    report={"conversion": report})
        ))
        model = session.get(ModelRow, job.model_id)
        if not owned or model is None or model.state != CONVERTING:
            raise Cancelled("the conversion was cancelled, taken over or its model deleted")
        model.state = "ready"
        model.inputs = [s.to_json() for s in inputs]
        model.outputs = [s.to_json() for s in outputs]
        model.opset, model.parameters = info.opset, info.parameters
        model.warnings = list(model.warnings or []) + warnings
        return model

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
