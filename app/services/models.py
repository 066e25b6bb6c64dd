"""Model registry: validate an upload completely, then store its files and metadata, or nothing."""

from __future__ import annotations

import logging
import re
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.errors import Conflict, InvalidContent, ModelNotFound, NotFound, UnsupportedFormat, VariantNotFound
from app.formats import datasets as dataset_format
from app.formats.onnx_model import inspect_onnx, smoke_test
from app.runtime.datatypes import TensorSpec
from app.services.catalog import Catalog, can_batch
from app.storage import repositories
from app.storage.artifacts import ArtifactStore, TempWriter
from app.storage.db import transaction
from app.storage.tables import DatasetRow, ModelRow, VariantRow

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MODEL_SUFFIX = ".onnx"
DATASET_SUFFIX = ".npz"
ORIGINAL = "original"
_PICKLE_PROTOCOL_MARK = 0x80
_ZIP_MAGIC = b"PK\x03\x04"


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
        providers: list[str],
    ) -> None:
        self._session_factory = session_factory
        self._store = store
        self._catalog = catalog
        self._providers = providers

    def create(self, *, name: str, model: IncomingFile, samples: IncomingFile | None) -> ModelRow:
        """Validate the model (and samples) fully, then commit files and rows; a failure stores nothing."""
        check_name(name)
        with self._session_factory() as session:
            if repositories.model_name_taken(session, name=name):
                raise Conflict(f"a model named '{name}' already exists", code="name_taken")
        model_label = display_name(model.filename, "the model file")
        model.temp.close()
        _refuse_non_onnx(model.temp.path, model.filename, model_label)
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
        del session_ort
        warnings = [warning] if warning else []

        model_path = self._store.commit(model.temp, MODEL_SUFFIX)
        row = ModelRow(
            name=name, state="ready", format="onnx", sha256=model.temp.sha256,
            size_bytes=model_path.stat().st_size, opset=info.opset, parameters=info.parameters,
            inputs=[s.to_json() for s in info.inputs], outputs=[s.to_json() for s in info.outputs],
            warnings=warnings, routing={"default": ORIGINAL, "canary": None, "shadow": None}, config={},
        )
        row.variants.append(VariantRow(
            name=ORIGINAL, recipe=None, parent=None, sha256=row.sha256, size_bytes=row.size_bytes, report=None,
        ))
        if samples is not None and dataset is not None:
            self._store.commit(samples.temp, DATASET_SUFFIX)
            row.datasets.append(_dataset_row("samples", samples.temp, dataset))
        stored = [(row.sha256, MODEL_SUFFIX)] + [(d.sha256, DATASET_SUFFIX) for d in row.datasets]
        try:
            with transaction(self._session_factory) as session:
                session.add(row)
        except IntegrityError:
            # Another upload took the name between our check and our insert.
            self._drop_unreferenced(stored)
            raise Conflict(f"a model named '{name}' already exists", code="name_taken") from None
        except BaseException:
            self._drop_unreferenced(stored)
            raise
        self._catalog.invalidate(name)
        log.info("registered model %s (%s, %d bytes)", name, row.sha256[:12], row.size_bytes)
        return self.get(name)

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
        upload.temp.close()
        specs = [TensorSpec.from_json(s) for s in row.inputs]
        dataset = dataset_format.load_dataset(
            upload.temp.path, specs, display_name=display_name(upload.filename, "the dataset file")
        )
        self._store.commit(upload.temp, DATASET_SUFFIX)
        dataset_row = _dataset_row(dataset_name, upload.temp, dataset)
        dataset_row.model_id = row.id
        try:
            with transaction(self._session_factory) as session:
                session.add(dataset_row)
        except IntegrityError:
            self._drop_unreferenced([(dataset_row.sha256, DATASET_SUFFIX)])
            raise Conflict(f"model '{model_name}' changed while the dataset was stored; try again") from None
        return dataset_row

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


def _dataset_row(name: str, temp: TempWriter, dataset: dataset_format.Dataset) -> DatasetRow:
    return DatasetRow(
        id=str(uuid.uuid4()), name=name, sha256=temp.sha256, size_bytes=temp.size,
        samples=dataset.samples, has_labels=dataset.labels is not None,
    )


def _refuse_non_onnx(path: Path, filename: str, label: str) -> None:
    with open(path, "rb") as handle:
        head = handle.read(4)
    suffix = Path(filename).suffix.lower()
    if head[:1] == bytes([_PICKLE_PROTOCOL_MARK]) or (head == _ZIP_MAGIC and _is_torch_pickle(path)):
        raise UnsupportedFormat(
            f"{label} is a Python pickle (torch.save); pickles are never loaded because loading one can run "
            "arbitrary code. Export the model to ONNX with torch.onnx.export(model, example, 'model.onnx', "
            "external_data=False) and upload that",
            code="pickle_refused",
        )
    if head == _ZIP_MAGIC or suffix in (".pt", ".pt2", ".pth"):
        raise UnsupportedFormat(
            f"{label} is a PyTorch archive; this server accepts ONNX (.onnx) files: export with "
            "torch.onnx.export(model, example, 'model.onnx', external_data=False)"
        )
    if suffix not in ("", ".onnx"):
        raise UnsupportedFormat(f"{label} has the unsupported extension '{suffix}'; upload an ONNX model (.onnx)")


def _is_torch_pickle(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("data.pkl") for n in archive.namelist()) and not any(
                n.endswith("/code/") or "/code/" in n for n in archive.namelist()
            )
    except zipfile.BadZipFile:
        return False
