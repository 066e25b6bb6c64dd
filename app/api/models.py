"""Model management routes: upload, list, inspect, delete; variants and datasets of a model."""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse

from app.api.deps import Admin, ModelName, Reader, ServicesDep, VariantName
from app.api.multipart import UploadForm, read_upload_form
from app.api.schemas import (
    BatchingUpdate,
    CaptureUpdate,
    DatasetPublic,
    DatasetsPublic,
    LatencyPublic,
    ModelPublic,
    ModelsPublic,
    RoutingPublic,
    RoutingUpdate,
    SessionUpdate,
    VariantPublic,
    VariantsPublic,
    dataset_public,
    model_public,
    variant_public,
)
from app.errors import Conflict, InvalidInput, SlimServeError, VariantNotFound
from app.services.models import MODEL_SUFFIX, ORIGINAL, IncomingFile

router = APIRouter(tags=["models"])

UPLOAD_FIELDS = {"file", "name", "samples", "compress", "promote", "input_shapes", "task"}
_UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "name"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": (
                            "The model: ONNX (.onnx), a torch.export archive (.pt2, torch.export.save), "
                            "TorchScript (.pt, torch.jit.save), or an archive (.zip, .tar, .tar.gz) of one model "
                            "folder: a Hugging Face folder (config.json, safetensors, tokenizer) or an ONNX model "
                            "with its external data files. PyTorch files and Hugging Face folders are converted to "
                            "ONNX by a job: the model is 'converting' until it ends. Pickles (torch.save) are "
                            "refused.")},
                        "task": {"type": "string", "enum": ["embeddings", "classification", "token-classification",
                                                           "generation"],
                                 "example": "embeddings", "description": (
                            "Hugging Face folders only: what the model serves; inferred from the folder when "
                            "absent (sentence-transformers files or a base model: embeddings; *ForSequence"
                            "Classification: classification; *ForTokenClassification: token-classification; "
                            "*ForCausalLM: generation)")},
                        "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,63}$",
                                 "description": "The name it is served under", "example": "mymodel"},
                        "samples": {"type": "string", "format": "binary",
                                    "description": ".npz with one array per input (+ optional labels); "
                                                   "stored as the model's first dataset"},
                        "compress": {"type": "string", "example": "int8-static",
                                     "description": "A preset name or a recipe as JSON: starts a job at once"},
                        "promote": {"type": "boolean", "description": "With compress: make the result the "
                                                                      "default variant if within budget",
                                    "example": False},
                        "input_shapes": {"type": "string", "example": '{"x": ["batch", 1, 8, 8]}',
                                         "description": (
                            "PyTorch files only, JSON {input: [dims]} or {input: {\"shape\": [dims], "
                            "\"dtype\": \"INT64\"}}: example inputs for the conversion when no samples are sent. "
                            "A dim is a size or an axis name; named axes (and always the first) are dynamic")},
                    },
                }
            }
        },
    }
}


def _incoming(form: UploadForm, field: str) -> IncomingFile | None:
    upload = form.files.get(field)
    return IncomingFile(filename=upload.filename, temp=upload.temp) if upload else None


def _check_fields(form: UploadForm, required: set[str], accepted: set[str]) -> None:
    unknown = (set(form.fields) | set(form.files)) - accepted
    if unknown:
        raise InvalidInput(
            f"unknown form field(s) {', '.join(sorted(unknown))}; accepted: {', '.join(sorted(accepted))}"
        )
    for name in sorted(required):
        if name not in form.fields and name not in form.files:
            raise InvalidInput(f"form field '{name}' is required")


@router.post("/models", status_code=HTTPStatus.CREATED, response_model=ModelPublic, openapi_extra=_UPLOAD_DOC)
async def upload_model(request: Request, services: ServicesDep, _key: Admin) -> ModelPublic:
    """Upload a model; it is validated completely and stored only if every check passes."""
    form = await read_upload_form(
        request, store=services.store, file_fields={"file", "samples"},
        max_bytes=services.settings.max_upload_bytes,
    )
    try:
        _check_fields(form, {"file", "name"}, UPLOAD_FIELDS)
        if "name" in form.files or "file" in form.fields:
            raise InvalidInput("'file' must be a file and 'name' a text field")
        model_file = _incoming(form, "file")
        assert model_file is not None
        compress = _compress_field(form)
        promote = form.fields.get("promote", "false").strip().lower() in ("1", "true", "yes")
        if compress is not None:
            services.jobs.check_recipe(compress)
        row = await asyncio.to_thread(
            services.models.create, name=form.fields["name"], model=model_file, samples=_incoming(form, "samples"),
            input_shapes=form.fields.get("input_shapes"),
            after_conversion={"recipe": compress, "promote": promote} if compress is not None else None,
            task=form.fields.get("task") or None,
        )
    finally:
        form.discard()
    if compress is not None and row.state == "ready":
        try:
            await asyncio.to_thread(services.jobs.create, model_name=row.name, recipe=compress, promote=promote)
        except SlimServeError:
            # A refused recipe refuses the whole upload: the user sees one answer and nothing half-done.
            await asyncio.to_thread(services.models.delete, row.name)
            raise
    return model_public(row)


def _compress_field(form: UploadForm) -> str | dict[str, Any] | None:
    raw = form.fields.get("compress")
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"'compress' is neither a preset name nor valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise InvalidInput("'compress' JSON must be an object with 'steps'")
        return parsed
    return text


@router.get("/models", response_model=ModelsPublic)
async def list_models(services: ServicesDep, _key: Reader) -> ModelsPublic:
    """List every model with its variants, routing and datasets."""
    rows = await asyncio.to_thread(services.models.list_all)
    return ModelsPublic(models=[model_public(r) for r in rows])


@router.get("/models/{name}", response_model=ModelPublic)
async def get_model(name: ModelName, services: ServicesDep, _key: Reader) -> ModelPublic:
    """One model, with live shadow statistics."""
    row = await asyncio.to_thread(services.models.get, name)
    return model_public(row, await asyncio.to_thread(services.routing.shadow_stats, name))


@router.get("/models/{name}/latency", response_model=LatencyPublic)
async def get_latency(name: ModelName, services: ServicesDep, _key: Reader,
                      minutes: Annotated[float, Query(gt=0, le=30, description="Window length",
                                                      openapi_examples={"5 minutes": {"value": 5.0}})] = 5.0,
                      ) -> LatencyPublic:
    """Per-variant request latency p50/p99 over the last minutes, from this server's own histograms (all its
    processes): what Prometheus' histogram_quantile over the same window gives."""
    await asyncio.to_thread(services.models.get, name)
    return LatencyPublic(model=name, window_seconds=minutes * 60,
                         variants=services.latency.summary(name, minutes * 60))


@router.delete("/models/{name}", status_code=HTTPStatus.NO_CONTENT, response_class=Response)
async def delete_model(name: ModelName, services: ServicesDep, _key: Admin) -> Response:
    """Delete a model with its variants, datasets and files."""
    served = await asyncio.to_thread(services.models.delete, name)
    services.inference.forget(served)
    services.generation.forget(served)
    services.metrics.forget_model(name)
    return Response(status_code=HTTPStatus.NO_CONTENT)


@router.get("/models/{name}/variants", response_model=VariantsPublic)
async def list_variants(name: ModelName, services: ServicesDep, _key: Reader) -> VariantsPublic:
    """Every variant of a model, the original first."""
    row = await asyncio.to_thread(services.models.get, name)
    return VariantsPublic(variants=[variant_public(v) for v in row.variants])


@router.get("/models/{name}/variants/{variant}", response_model=VariantPublic)
async def get_variant(name: ModelName, variant: VariantName, services: ServicesDep, _key: Reader) -> VariantPublic:
    """One variant with its report."""
    row = await asyncio.to_thread(services.models.get, name)
    for candidate in row.variants:
        if candidate.name == variant:
            return variant_public(candidate)
    raise VariantNotFound(name, variant)


@router.get("/models/{name}/variants/{variant}/artifact", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}, "application/x-tar": {}},
                             "description": "The ONNX file; a .tar of the model's folder when it keeps "
                                            "external data files"}})
async def download_variant(name: ModelName, variant: VariantName, services: ServicesDep,
                           _key: Reader) -> Response:
    """Download the ONNX file of a variant, or a tar of its folder when it is several files."""
    path, folder = await asyncio.to_thread(services.models.artifact, name, variant)
    if folder is None:
        return FileResponse(path, media_type="application/octet-stream", filename=f"{name}-{variant}{MODEL_SUFFIX}")
    prefix = f"{name}-{variant}"
    return StreamingResponse(services.models.folder_chunks(folder, prefix), media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{prefix}.tar"'})


@router.delete("/models/{name}/variants/{variant}", status_code=HTTPStatus.NO_CONTENT, response_class=Response)
async def delete_variant(name: ModelName, variant: VariantName, services: ServicesDep, _key: Admin) -> Response:
    """Delete a compressed variant (never the original, nor the variant that routing sends traffic to)."""
    if variant == ORIGINAL:
        raise Conflict("the original variant cannot be deleted; delete the model instead")
    served = await asyncio.to_thread(services.models.delete_variant, name, variant)
    services.inference.forget(served)
    services.generation.forget(served)
    return Response(status_code=HTTPStatus.NO_CONTENT)


@router.post("/models/{name}/datasets", status_code=HTTPStatus.CREATED, response_model=DatasetPublic,
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["file"], "properties": {
                     "file": {"type": "string", "format": "binary",
                              "description": ".npz: one array per model input, optional 'labels'"},
                     "name": {"type": "string", "description": "Its name, unique within the model",
                              "example": "calibration"}}}}}}})
async def upload_dataset(name: ModelName, request: Request, services: ServicesDep, _key: Admin) -> DatasetPublic:
    """Attach a dataset (.npz) to a model, checked against the model's inputs."""
    form = await read_upload_form(
        request, store=services.store, file_fields={"file"}, max_bytes=services.settings.max_upload_bytes
    )
    try:
        _check_fields(form, {"file"}, {"file", "name"})
        upload = _incoming(form, "file")
        assert upload is not None
        row = await asyncio.to_thread(
            services.models.add_dataset, model_name=name, upload=upload, name=form.fields.get("name")
        )
    finally:
        form.discard()
    return dataset_public(row)


@router.get("/models/{name}/datasets", response_model=DatasetsPublic)
async def list_datasets(name: ModelName, services: ServicesDep, _key: Reader) -> DatasetsPublic:
    """Datasets of a model."""
    rows = await asyncio.to_thread(services.models.list_datasets, name)
    return DatasetsPublic(datasets=[dataset_public(d) for d in rows])


@router.put("/models/{name}/capture")
async def enable_capture(name: ModelName, body: CaptureUpdate, services: ServicesDep, _key: Admin) -> dict[str, Any]:
    """Keep a reservoir sample of real prediction inputs as the model's `traffic` dataset."""
    return await asyncio.to_thread(services.capture.configure, name, body.samples)


@router.delete("/models/{name}/capture")
async def disable_capture(name: ModelName, services: ServicesDep, _key: Admin) -> dict[str, Any]:
    """Stop capturing; the `traffic` dataset stays."""
    return await asyncio.to_thread(services.capture.configure, name, None)


@router.put("/models/{name}/routing", response_model=RoutingPublic)
async def set_routing(name: ModelName, body: RoutingUpdate, services: ServicesDep, _key: Admin) -> RoutingPublic:
    """Default variant, canary split and shadow traffic; every server process follows within a second."""
    routing = await asyncio.to_thread(services.routing.update, name, body.model_dump())
    return RoutingPublic(**routing)


@router.put("/models/{name}/batching")
async def set_batching(name: ModelName, body: BatchingUpdate, services: ServicesDep, _key: Admin) -> dict[str, Any]:
    """Dynamic batching of this model's variants (on by default for models with a batch axis)."""
    return await asyncio.to_thread(services.models.configure_batching, name, body.model_dump())


@router.put("/models/{name}/variants/{variant}/session")
async def set_session_options(name: ModelName, variant: VariantName, body: SessionUpdate, services: ServicesDep,
                              _key: Admin) -> dict[str, Any]:
    """Threads and graph optimization level of one variant's onnxruntime session."""
    options, sha = await asyncio.to_thread(services.models.configure_session, name, variant, body.model_dump())
    services.inference.forget([sha])
    services.generation.forget([sha])
    return options
