"""Model registry: validate an upload completely, then store its files and metadata, or nothing."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.compression import preflight
from app.errors import Conflict, InvalidContent, InvalidInput, ModelNotFound, NotFound, VariantNotFound
from app.formats import datasets as dataset_format
from app.formats import torch_archive
from app.formats.onnx_model import inspect_onnx, smoke_test
from app.formats.torch_inputs import parse_input_shapes
from app.runtime.datatypes import TensorSpec
from app.services.catalog import Catalog, can_batch
from app.storage import repositories
from app.storage.artifacts import ArtifactStore, TempWriter
from app.storage.db import transaction
from app.storage.tables import DatasetRow, JobRow, ModelRow, VariantRow

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MODEL_SUFFIX = ".onnx"
DATASET_SUFFIX = ".npz"
ORIGINAL = "original"
CONVERTING = "converting"
CONVERT = "convert"  # the preset name of conversion jobs


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
        providers: list[str], enqueue: Callable[[str], None],
    ) -> None:
        self._session_factory = session_factory
        self._store = store
        self._catalog = catalog
        self._providers = providers
        self._enqueue = enqueue

    def create(self, *, name: str, model: IncomingFile, samples: IncomingFile | None,
               input_shapes: str | None = None, after_conversion: dict[str, Any] | None = None) -> ModelRow:
        """Validate the model (and samples) fully, then commit files and rows; a failure stores nothing.

        A PyTorch file is vetted here and converted by a job: the model is `converting` until the job ends.
        """
        check_name(name)
        with self._session_factory() as session:
            if repositories.model_name_taken(session, name=name):
                raise Conflict(f"a model named '{name}' already exists", code="name_taken")
        model_label = display_name(model.filename, "the model file")
        model.temp.close()
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
        conversion: dict[str, Any] = {
            "source_format": archive.kind, "filename": label.strip("'") if label.startswith("'") else None,
            "input_shapes": shapes, "state": "queued"}
        suffix = torch_archive.SUFFIXES[archive.kind]
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
            name=name, state=CONVERTING, format=archive.kind, sha256=model.temp.sha256,
            size_bytes=source_path.stat().st_size, opset=None, parameters=None, inputs=[], outputs=[], warnings=[],
            routing={"default": ORIGINAL, "canary": None, "shadow": None}, config={"conversion": conversion},
        )
        job = JobRow(id=str(uuid.uuid4()), model_name=name, recipe={"convert": archive.kind}, preset=CONVERT,
                     variant=ORIGINAL, promote=False, state="queued", progress=0.0, stage="queued", attempts=0,
                     cancel_requested=False)
        self._insert(row, stored, job)
        self._enqueue(job.id)
        log.info("model %s uploaded as %s (%d bytes); conversion job %s queued", name, archive.kind,
                 row.size_bytes, job.id)
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
        specs = [TensorSpec.from_json(s) for s in row.inputs]
        dataset = dataset_format.load_dataset(
            upload.temp.path, specs, display_name=display_name(upload.filename, "the dataset file")
        )
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
                    self._store.remove(sha, suffix)


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
    """The uploaded PyTorch file and its samples, kept beside the converted ONNX."""
    if row.format not in torch_archive.SUFFIXES:
        return []
    files = [(row.sha256, torch_archive.SUFFIXES[row.format])]
    samples = (row.config or {}).get("conversion", {}).get("samples_sha256")
    if samples:
        files.append((samples, DATASET_SUFFIX))
    return files
