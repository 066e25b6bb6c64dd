"""Model registry: validate an upload completely, then store its files and metadata, or nothing."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.compression import preflight
from app.errors import (
    Conflict,
    InvalidContent,
    InvalidInput,
    ModelNotFound,
    NotFound,
    UnsupportedFormat,
    VariantNotFound,
)
from app.formats import archives, huggingface, keras_file, torch_archive
from app.formats import datasets as dataset_format
from app.formats.onnx_model import external_files, inspect_onnx, onnx_proto, smoke_test
from app.formats.torch_inputs import parse_input_shapes
from app.runtime.datatypes import TensorSpec
from app.services.catalog import Catalog, can_batch
from app.services.text import TOKENIZER_SUFFIX, TextModels
from app.storage import repositories
from app.storage.artifacts import MANIFEST, MODEL_ENTRY, MODEL_FOLDER, ArtifactStore, TempWriter
from app.storage.db import transaction
from app.storage.tables import DatasetRow, JobRow, ModelRow, VariantRow
from app.text import datasets as text_datasets

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MODEL_SUFFIX = ".onnx"
# The file a converting model was uploaded as, by its format.
SOURCE_SUFFIXES = {**torch_archive.SUFFIXES, **keras_file.SUFFIXES}
DATASET_SUFFIX = ".npz"
ORIGINAL = "original"
CONVERTING = "converting"
CONVERT = "convert"  # the preset name of conversion jobs
HUGGINGFACE = "huggingface"
HF_FOLDER = ".hfd"  # a Hugging Face folder as uploaded, kept for its conversion


@dataclass(frozen=True)
class UploadLimits:
    max_unpacked_bytes: int = 256 * 1024**3
    max_archive_members: int = 10_000
    max_context_tokens: int = huggingface.DEFAULT_MAX_CONTEXT


@dataclass
class IncomingFile:
    """An uploaded file already streamed to a temp file; `filename` is only used in messages."""

    filename: str
    temp: TempWriter


def check_name(name: str, what: str = "model name") -> str:
    if not NAME_PATTERN.match(name):
        raise InvalidContent(
            f"invalid {what} {name[:80]!r}: use 1-64 characters from a-z, 0-9, '.', '_' and '-', "
            "starting with a letter or digit",
            code="invalid_name",
        )
    return name


def display_name(filename: str, fallback: str) -> str:
    base = Path(filename.replace("\\", "/")).name if filename else ""
    clean = "".join(ch for ch in base if ch.isprintable())[:100]
    return f"'{clean}'" if clean else fallback


class ModelService:
    def __init__(
        self, *, session_factory: sessionmaker[Session], store: ArtifactStore, catalog: Catalog,
        providers: list[str], enqueue: Callable[[str], None], limits: UploadLimits | None = None,
    ) -> None:
        self._limits = limits or UploadLimits()
        self._texts = TextModels(store)
        self._session_factory = session_factory
        self._store = store
        self._catalog = catalog
        self._providers = providers
        self._enqueue = enqueue

    def create(self, *, name: str, model: IncomingFile, samples: IncomingFile | None,
               input_shapes: str | None = None, after_conversion: dict[str, Any] | None = None,
               task: str | None = None) -> ModelRow:
        """Validate the model (and samples) fully, then commit files and rows; a failure stores nothing.

        A PyTorch file is vetted here and converted by a job: the model is `converting` until the job ends.
        """
        check_name(name)
        with self._session_factory() as session:
            if repositories.model_name_taken(session, name=name):
                raise Conflict(f"a model named '{name}' already exists", code="name_taken")
        model_label = display_name(model.filename, "the model file")
        model.temp.close()
        keras_kind = keras_file.sniff(model.temp.path, model.filename, model_label)
        if keras_kind is not None:
            if input_shapes is not None or task is not None:
                raise InvalidContent("'input_shapes' and 'task' do not apply to Keras files: a Keras model declares "
                                     "its inputs")
            return self._create_keras(name, model, model_label, keras_kind, samples, after_conversion)
        kind = archives.kind_of(model.temp.path)
        if kind is not None and not (kind == "zip" and torch_archive.is_torch_zip(model.temp.path)):
            if input_shapes is not None:
                raise InvalidContent("'input_shapes' applies to PyTorch files only")
            return self._create_from_archive(name, model, model_label, samples, after_conversion, task)
        if task is not None:
            raise InvalidContent("'task' applies to Hugging Face folders (an archive with config.json)")
        _refuse_gguf(model.temp.path, model_label)
        archive = torch_archive.sniff(model.temp.path, model.filename, model_label)
        if archive is not None:
            return self._create_converting(name, model, model_label, archive, samples, input_shapes,
                                           after_conversion)
        if input_shapes is not None:
            raise InvalidContent("'input_shapes' applies to PyTorch files only; an ONNX model declares its shapes")
        info, session_ort = inspect_onnx(model.temp.path, display_name=model_label, providers=self._providers)
        dataset = None
        if samples is not None:
            samples.temp.close()
            dataset = dataset_format.load_dataset(
                samples.temp.path, info.inputs, display_name=display_name(samples.filename, "the samples file")
            )
        sample_feeds = None
        if dataset is not None:
            sample_feeds = {spec.name: dataset_format.batch_of(dataset, spec, 8) for spec in info.inputs}
        warning = smoke_test(session_ort, info.inputs, sample_feeds)
        model_profile = preflight.profile(model.temp.path, runner=session_ort)
        del session_ort
        warnings = [warning] if warning else []

        model_path = self._store.commit(model.temp, MODEL_SUFFIX)
        row = ModelRow(
            name=name, state="ready", format="onnx", sha256=model.temp.sha256,
            size_bytes=model_path.stat().st_size, opset=info.opset, parameters=info.parameters,
            inputs=[s.to_json() for s in info.inputs], outputs=[s.to_json() for s in info.outputs],
            warnings=warnings, routing={"default": ORIGINAL, "canary": None, "shadow": None},
            config={"profile": model_profile},
        )
        row.variants.append(VariantRow(
            name=ORIGINAL, recipe=None, parent=None, sha256=row.sha256, size_bytes=row.size_bytes, report=None,
        ))
        if samples is not None and dataset is not None:
            self._store.commit(samples.temp, DATASET_SUFFIX)
            row.datasets.append(dataset_row("samples", samples.temp.sha256, samples.temp.size, dataset))
        stored = [(row.sha256, MODEL_SUFFIX)] + [(d.sha256, DATASET_SUFFIX) for d in row.datasets]
        self._insert(row, stored)
        log.info("registered model %s (%s, %d bytes)", name, row.sha256[:12], row.size_bytes)
        return self.get(name)

    def _create_from_archive(self, name: str, model: IncomingFile, label: str, samples: IncomingFile | None,
                             after_conversion: dict[str, Any] | None, task: str | None) -> ModelRow:
        """A .zip/.tar/.tar.gz of one model folder: a Hugging Face folder, or an ONNX model with its data files."""
        folder = self._store.temp_path(".unpack")
        try:
            unpacked = archives.unpack(model.temp.path, folder, label=label, max_bytes=self._limits.max_unpacked_bytes,
                                       max_members=self._limits.max_archive_members,
                                       free_bytes=self._store.free_bytes)
            model.temp.discard()  # unpacked: the archive itself is no longer needed
            root = unpacked.root
            keras_file.refuse_saved_model(root, label)
            if huggingface.is_huggingface(root):
                if samples is not None:
                    raise InvalidContent("'samples' cannot come with a Hugging Face folder: upload a text dataset "
                                         "(.txt or .jsonl) once the model is converted")
                return self._create_huggingface(name, root, label, task, after_conversion)
            if task is not None:
                raise InvalidContent("'task' applies to Hugging Face folders (an archive with config.json)")
            entry = _onnx_entry(root, label)
            info, session_ort = inspect_onnx(entry, display_name=f"{label}: '{entry.name}'",
                                             providers=self._providers, folder=root)
            dataset = self._check_samples(samples, info)
            warning = smoke_test(session_ort, info.inputs, self._sample_feeds(dataset, info))
            model_profile = preflight.profile(entry, runner=session_ort, load_weights=False)
            del session_ort
            sha, size, kind = self._commit_onnx_folder(entry, root)
        finally:
            archives.remove(folder)
        row = ModelRow(
            name=name, state="ready", format="onnx", sha256=sha, size_bytes=size, opset=info.opset,
            parameters=info.parameters, inputs=[s.to_json() for s in info.inputs],
            outputs=[s.to_json() for s in info.outputs], warnings=[warning] if warning else [],
            routing={"default": ORIGINAL, "canary": None, "shadow": None},
            config={"profile": model_profile, "files": kind},
        )
        row.variants.append(VariantRow(name=ORIGINAL, recipe=None, parent=None, sha256=sha, size_bytes=size,
                                       report=None))
        stored = [(sha, MODEL_SUFFIX)]
        if samples is not None and dataset is not None:
            self._store.commit(samples.temp, DATASET_SUFFIX)
            row.datasets.append(dataset_row("samples", samples.temp.sha256, samples.temp.size, dataset))
            stored.append((samples.temp.sha256, DATASET_SUFFIX))
        self._insert(row, stored)
        log.info("registered model %s from an archive (%s, %d bytes, %s)", name, sha[:12], size, kind)
        return self.get(name)

    def _commit_onnx_folder(self, entry: Path, root: Path) -> tuple[str, int, str]:
        return commit_onnx(self._store, entry, root)

    def _create_huggingface(self, name: str, root: Path, label: str, task: str | None,
                            after_conversion: dict[str, Any] | None) -> ModelRow:
        """Vet the folder here (JSON and bytes only), keep it, and let a job convert it with transformers."""
        summary = huggingface.inspect(root, label=label, task=task, max_context=self._limits.max_context_tokens)
        sha, size, _ = self._store.commit_folder(root, HF_FOLDER)
        conversion: dict[str, Any] = {"source_format": HUGGINGFACE, "filename": label.strip("'"), "state": "queued"}
        if after_conversion is not None:
            conversion["after"] = after_conversion
        row = ModelRow(
            name=name, state=CONVERTING, format=HUGGINGFACE, sha256=sha, size_bytes=size, opset=None,
            parameters=None, inputs=[], outputs=[], warnings=[],
            routing={"default": ORIGINAL, "canary": None, "shadow": None},
            config={"conversion": conversion, "huggingface": summary.to_json()},
        )
        job = JobRow(id=str(uuid.uuid4()), model_name=name, recipe={"convert": HUGGINGFACE}, preset=CONVERT,
                     variant=ORIGINAL, promote=False, state="queued", progress=0.0, stage="queued", attempts=0,
                     cancel_requested=False)
        self._insert(row, [(sha, HF_FOLDER)], job)
        self._enqueue(job.id)
        log.info("model %s uploaded as a Hugging Face folder (%s, %s); conversion job %s queued", name,
                 summary.architecture, summary.task, job.id)
        return self.get(name)

    def _check_samples(self, samples: IncomingFile | None, info: Any) -> dataset_format.Dataset | None:
        if samples is None:
            return None
        samples.temp.close()
        return dataset_format.load_dataset(samples.temp.path, info.inputs,
                                           display_name=display_name(samples.filename, "the samples file"))

    @staticmethod
    def _sample_feeds(dataset: dataset_format.Dataset | None, info: Any) -> dict[str, Any] | None:
        if dataset is None:
            return None
        return {spec.name: dataset_format.batch_of(dataset, spec, 8) for spec in info.inputs}

    def _create_converting(self, name: str, model: IncomingFile, label: str, archive: torch_archive.TorchArchive,
                           samples: IncomingFile | None, input_shapes: str | None,
                           after_conversion: dict[str, Any] | None) -> ModelRow:
        if archive.kind == torch_archive.TORCH_EXPORT:
            torch_archive.vet_exported_program(model.temp.path, archive.root, label)
        shapes = _parse_input_shapes(input_shapes) if input_shapes is not None else None
        if archive.kind == torch_archive.TORCHSCRIPT and samples is None and shapes is None:
            raise InvalidContent(f"{label} is TorchScript, which records no input shapes: send 'samples' (an .npz "
                                 "with one array per input) or 'input_shapes' (JSON {input: [dims]})",
                                 code="example_inputs_required")
        return self._queue_conversion(name, model, label, archive.kind, torch_archive.SUFFIXES[archive.kind],
                                      samples, {"input_shapes": shapes}, after_conversion)

    def _create_keras(self, name: str, model: IncomingFile, label: str, kind: str, samples: IncomingFile | None,
                      after_conversion: dict[str, Any] | None) -> ModelRow:
        """Vet the Keras file here (its config against the allowlist, in pure Python); a job converts it."""
        scratch = self._store.temp_path(".keras-vet")
        scratch.mkdir()
        try:
            summary = keras_file.vet(model.temp.path, kind, label, scratch)
        finally:
            archives.remove(scratch)
        return self._queue_conversion(name, model, label, kind, keras_file.SUFFIXES[kind], samples,
                                      {"keras": summary.to_json()}, after_conversion)

    def _queue_conversion(self, name: str, model: IncomingFile, label: str, kind: str, suffix: str,
                          samples: IncomingFile | None, details: dict[str, Any],
                          after_conversion: dict[str, Any] | None) -> ModelRow:
        """Store the vetted source file (and samples) and queue the job that converts it to ONNX."""
        conversion: dict[str, Any] = {
            "source_format": kind, "filename": label.strip("'") if label.startswith("'") else None,
            **details, "state": "queued"}
        stored = [(model.temp.sha256, suffix)]
        if samples is not None:
            samples.temp.close()
            samples_label = display_name(samples.filename, "the samples file")
            arrays = dataset_format.read_arrays(samples.temp.path, display_name=samples_label)
            if not arrays or len({len(a) for a in arrays.values() if a.ndim}) != 1:
                raise InvalidContent(f"{samples_label} needs one array per input, all with the same first dimension")
            conversion["samples_sha256"] = samples.temp.sha256
            stored.append((samples.temp.sha256, DATASET_SUFFIX))
        if after_conversion is not None:
            conversion["after"] = after_conversion
        source_path = self._store.commit(model.temp, suffix)
        if samples is not None:
            self._store.commit(samples.temp, DATASET_SUFFIX)
        row = ModelRow(
            name=name, state=CONVERTING, format=kind, sha256=model.temp.sha256,
            size_bytes=source_path.stat().st_size, opset=None, parameters=None, inputs=[], outputs=[], warnings=[],
            routing={"default": ORIGINAL, "canary": None, "shadow": None}, config={"conversion": conversion},
        )
        job = JobRow(id=str(uuid.uuid4()), model_name=name, recipe={"convert": kind}, preset=CONVERT,
                     variant=ORIGINAL, promote=False, state="queued", progress=0.0, stage="queued", attempts=0,
                     cancel_requested=False)
        self._insert(row, stored, job)
        self._enqueue(job.id)
        log.info("model %s uploaded as %s (%d bytes); conversion job %s queued", name, kind, row.size_bytes, job.id)
        return self.get(name)

    def _insert(self, row: ModelRow, stored: list[tuple[str, str]], job: JobRow | None = None) -> None:
        try:
            with transaction(self._session_factory) as session:
                session.add(row)
                if job is not None:
                    session.flush()
                    job.model_id = row.id
                    session.add(job)
        except IntegrityError:
            # Another upload took the name between our check and our insert.
            self._drop_unreferenced(stored)
            raise Conflict(f"a model named '{row.name}' already exists", code="name_taken") from None
        except BaseException:
            self._drop_unreferenced(stored)
            raise
        self._catalog.invalidate(row.name)

    def get(self, name: str) -> ModelRow:
        with self._session_factory() as session:
            row = repositories.get_model(session, name=name)
            if row is None:
                raise ModelNotFound(name)
            return row

    def list_all(self) -> list[ModelRow]:
        with self._session_factory() as session:
            return list(repositories.list_models(session))

    def delete(self, name: str) -> list[str]:
        """Remove the model's rows, then any file no other row shares; returns the artifact keys it served."""
        with transaction(self._session_factory) as session:
            row = repositories.get_model(session, name=name)
            if row is None:
                raise ModelNotFound(name)
            files = [(v.sha256, MODEL_SUFFIX) for v in row.variants]
            files += [(d.sha256, DATASET_SUFFIX) for d in row.datasets]
            files += _conversion_files(row)
            repositories.cancel_jobs_of_model(session, model_id=row.id, reason="model deleted")
            session.delete(row)
        self._catalog.invalidate(name)
        self._drop_unreferenced(files)
        return [sha for sha, suffix in files if suffix == MODEL_SUFFIX]

    def artifact(self, model_name: str, variant: str) -> tuple[Path, Path | None]:
        """(the variant's ONNX file, its folder when the model keeps external data beside it, else None)."""
        with self._session_factory() as session:
            _, target = _model_and_variant(session, model_name, variant)
            sha = target.sha256
        path = self._store.model(sha)
        folder = path.parent if path.name == MODEL_ENTRY and path.parent.name.endswith(MODEL_FOLDER) else None
        return path, folder

    @staticmethod
    def folder_chunks(folder: Path, prefix: str) -> Iterator[bytes]:
        """The folder as an uncompressed tar, streamed (a model of many GB is never read whole)."""
        return archives.tar_chunks(folder, prefix, skip=(MANIFEST,))

    def delete_variant(self, model_name: str, variant: str) -> list[str]:
        with transaction(self._session_factory) as session:
            row, target = _model_and_variant(session, model_name, variant)
            if variant == ORIGINAL:
                raise Conflict("the original variant cannot be deleted; delete the model instead")
            routed = {row.routing.get("default")} | {
                (row.routing.get(kind) or {}).get("variant") for kind in ("canary", "shadow")
            }
            if variant in routed:
                raise Conflict(f"variant '{variant}' receives traffic; change the model's routing first")
            sha = target.sha256
            row.variants.remove(target)
        self._catalog.invalidate(model_name)
        self._drop_unreferenced([(sha, MODEL_SUFFIX)])
        return [sha]

    def configure_session(self, model_name: str, variant: str, options: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """Per-variant onnxruntime options; returns them and the variant's artifact hash (to close old sessions)."""
        with transaction(self._session_factory) as session:
            row, target = _model_and_variant(session, model_name, variant)
            row.config = {**row.config, "sessions": {**(row.config.get("sessions") or {}), variant: options}}
            sha = target.sha256
        self._catalog.invalidate(model_name)
        return options, sha

    def configure_batching(self, model_name: str, settings: dict[str, Any]) -> dict[str, Any]:
        with transaction(self._session_factory) as session:
            row = repositories.get_model(session, name=model_name)
            if row is None:
                raise ModelNotFound(model_name)
            if settings["enabled"] and not can_batch(row):
                raise InvalidContent("this model cannot be batched: an input or output has no dynamic first "
                                     "(batch) dimension")
            row.config = {**row.config, "batching": settings}
        self._catalog.invalidate(model_name)
        return settings

    def add_dataset(self, *, model_name: str, upload: IncomingFile, name: str | None) -> DatasetRow:
        row = self.get(model_name)
        dataset_name = check_name(name, "dataset name") if name else f"dataset-{uuid.uuid4().hex[:8]}"
        with self._session_factory() as session:
            if repositories.dataset_name_taken(session, model_id=row.id, name=dataset_name):
                raise Conflict(f"model '{model_name}' already has a dataset named '{dataset_name}'")
        if row.state != "ready":
            raise Conflict(f"model '{model_name}' is {row.state}; datasets are checked against its inputs, so add "
                           "them once it is ready", code="model_not_ready")
        upload.temp.close()
        label = display_name(upload.filename, "the dataset file")
        text = (row.config or {}).get("text")
        if (row.config or {}).get("generation") is not None:
            stored = self._generation_dataset(dataset_name, upload, label)
        elif text is not None and not _is_npz(upload.temp.path):
            stored = self._text_dataset(dataset_name, upload, label, text)
        else:
            specs = [TensorSpec.from_json(s) for s in row.inputs]
            if text is not None:  # an .npz for a text model holds token arrays, as the ONNX model takes them
                specs = [TensorSpec.from_json(s) for s in row.config["onnx_inputs"]]
            dataset = dataset_format.load_dataset(upload.temp.path, specs, display_name=label)
            self._store.commit(upload.temp, DATASET_SUFFIX)
            stored = dataset_row(dataset_name, upload.temp.sha256, upload.temp.size, dataset)
        stored.model_id = row.id
        try:
            with transaction(self._session_factory) as session:
                session.add(stored)
        except IntegrityError:
            self._drop_unreferenced([(stored.sha256, DATASET_SUFFIX)])
            raise Conflict(f"model '{model_name}' changed while the dataset was stored; try again") from None
        return stored

    def _text_dataset(self, name: str, upload: IncomingFile, label: str, text: dict[str, Any]) -> DatasetRow:
        """.txt or .jsonl for a text model: checked, tokenized once (to count what the model would cut), kept as
        text in an .npz (`text`, and `labels` when given), tokenized again by the job that uses it."""
        texts, labels = text_datasets.parse_text_file(upload.temp.path, label=label, labels=text.get("labels") or {})
        if labels is not None and text.get("labels") and int(labels.max()) >= len(text["labels"]):
            raise InvalidContent(f"{label}: label {int(labels.max())} is past the model's {len(text['labels'])} "
                                 "classes")
        _, truncated = text_datasets.token_arrays(texts, self._texts.tokenizer(text))
        arrays = {text_datasets.TEXT: np.array(texts, dtype=str)}
        if labels is not None:
            arrays[text_datasets.LABELS] = labels
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        upload.temp.discard()
        sha, path = self._store.write_bytes(buffer.getvalue(), DATASET_SUFFIX, "the text dataset")
        if truncated:
            log.info("text dataset %s: %d of %d texts are longer than the model's maximum", name, truncated,
                     len(texts))
        return DatasetRow(id=str(uuid.uuid4()), name=name, sha256=sha, size_bytes=path.stat().st_size,
                          samples=len(texts), has_labels=labels is not None)

    def _generation_dataset(self, name: str, upload: IncomingFile, label: str) -> DatasetRow:
        """.txt or .jsonl for a generation model: its texts calibrate (GPTQ) and measure (perplexity) variants."""
        if _is_npz(upload.temp.path):
            raise InvalidContent(f"{label}: a generation model takes text datasets (.txt, one text per line, or "
                                 ".jsonl with a 'text' field), not arrays")
        texts, _ = text_datasets.parse_text_file(upload.temp.path, label=label, labels={})
        buffer = io.BytesIO()
        np.savez(buffer, **{text_datasets.TEXT: np.array(texts, dtype=str)})  # type: ignore[arg-type]
        upload.temp.discard()
        sha, path = self._store.write_bytes(buffer.getvalue(), DATASET_SUFFIX, "the text dataset")
        return DatasetRow(id=str(uuid.uuid4()), name=name, sha256=sha, size_bytes=path.stat().st_size,
                          samples=len(texts), has_labels=False)

    def list_datasets(self, model_name: str) -> list[DatasetRow]:
        return list(self.get(model_name).datasets)

    def get_dataset(self, model_name: str, dataset_id: str) -> DatasetRow:
        for dataset in self.get(model_name).datasets:
            if dataset.id == dataset_id:
                return dataset
        raise NotFound(f"model '{model_name}' has no dataset '{dataset_id[:64]}'")

    def _drop_unreferenced(self, files: list[tuple[str, str]]) -> None:
        with self._session_factory() as session:
            for sha, suffix in files:
                if not repositories.artifact_in_use(session, sha256=sha):
                    if suffix == MODEL_SUFFIX:
                        self._store.remove_model(sha)  # one file, or a folder with external data
                    elif suffix == HF_FOLDER:
                        self._store.remove_folder(sha, suffix)
                    else:
                        self._store.remove(sha, suffix)


def _refuse_gguf(path: Path, label: str) -> None:
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            return
    raise UnsupportedFormat(
        f"{label} is a GGUF file (llama.cpp's format), which SlimServe does not convert: its weights are usually "
        "already quantized by llama.cpp, and dequantizing them gives neither the original to measure against nor "
        "a better INT4. Upload the Hugging Face folder it was made from (save_pretrained, zipped): SlimServe "
        "converts it and quantizes it to INT4 itself, measured against the original", code="gguf_not_supported")


def _is_npz(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def commit_onnx(store: ArtifactStore, entry: Path, root: Path) -> tuple[str, int, str]:
    """Store an ONNX model and only the data files it names: one file when it has none, else a folder.
    Returns (sha256, bytes, 'file' or 'folder of N files')."""
    model = onnx_proto(entry)
    data_files = sorted(external_files(model))
    if not data_files:
        temp = store.temp_path(MODEL_SUFFIX)
        os.replace(entry, temp)
        sha, size, _ = store.adopt(temp, MODEL_SUFFIX)
        return sha, size, "file"
    kept = store.temp_path(MODEL_FOLDER)
    kept.mkdir()
    os.replace(entry, kept / MODEL_ENTRY)
    for relative in data_files:
        target = kept / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(root / relative, target)
    sha, size, _ = store.commit_folder(kept, MODEL_FOLDER)
    return sha, size, f"folder of {len(data_files) + 1} files"


def _onnx_entry(root: Path, label: str) -> Path:
    """The one .onnx file of an unpacked model folder."""
    found = sorted(p for p in root.rglob("*.onnx") if p.is_file())
    if not found:
        raise InvalidContent(f"{label} holds no .onnx model (and no Hugging Face config.json)")
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in found[:5])
        raise InvalidContent(f"{label} holds {len(found)} .onnx files ({names}); an archive holds one model")
    return found[0]


def _model_and_variant(session: Session, model_name: str, variant: str) -> tuple[ModelRow, VariantRow]:
    row = repositories.get_model(session, name=model_name)
    if row is None:
        raise ModelNotFound(model_name)
    target = next((v for v in row.variants if v.name == variant), None)
    if target is None:
        raise VariantNotFound(model_name, variant)
    return row, target


def dataset_row(name: str, sha256: str, size_bytes: int, dataset: dataset_format.Dataset) -> DatasetRow:
    return DatasetRow(
        id=str(uuid.uuid4()), name=name, sha256=sha256, size_bytes=size_bytes,
        samples=dataset.samples, has_labels=dataset.labels is not None,
    )


def _parse_input_shapes(raw: str) -> dict[str, Any]:
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"'input_shapes' is not valid JSON: {exc}") from None
    return parse_input_shapes(parsed)


def _conversion_files(row: ModelRow) -> list[tuple[str, str]]:
    """What the converted ONNX was made from and is served with: the uploaded PyTorch file and its samples, or
    the Hugging Face folder and its tokenizer."""
    if row.format == HUGGINGFACE:
        tokenizer = ((row.config or {}).get("text") or {}).get("tokenizer_sha256")
        return [(row.sha256, HF_FOLDER)] + ([(tokenizer, TOKENIZER_SUFFIX)] if tokenizer else [])
    if row.format not in SOURCE_SUFFIXES:
        return []
    files = [(row.sha256, SOURCE_SUFFIXES[row.format])]
    samples = (row.config or {}).get("conversion", {}).get("samples_sha256")
    if samples:
        files.append((samples, DATASET_SUFFIX))
    return files
