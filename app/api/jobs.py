"""Compression jobs: submit, follow, cancel."""

from __future__ import annotations

import asyncio
from datetime import datetime
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import Admin, JobId, ModelName, Reader, ServicesDep
from app.api.schemas import DATASET_EXAMPLE, REPORT_EXAMPLE, TIME_EXAMPLE
from app.storage.tables import JobRow

router = APIRouter(tags=["compression"])


class CompressionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"recipe": "int8-static", "budget": {"metric": "agreement", "max_drop": 0.01}, "promote": False},
        {"recipe": {"steps": [{"op": "prune", "mode": "structured", "sparsity": 0.5}, {"op": "distill"},
                              {"op": "quantize", "mode": "static"}]}, "variant": "small-int8"},
        {"recipe": "auto", "objective": "latency"},
    ]})

    recipe: str | dict[str, Any] = Field(description="A preset name (optimize, int8-dynamic, int8-static, fp16, "
                                                     "int4-weight, prune-50, shrink-50, shrink-50-int8, "
                                                     "shrink-70-int8, auto) or {'steps': [...]}",
                                         examples=["int8-static"])
    dataset: str | None = Field(default=None, description="Dataset id or name; default: the model's first dataset",
                                examples=["samples"])
    variant: str | None = Field(default=None, description="Name of the result; default: the preset's name",
                                examples=["small-int8"])
    budget: dict[str, Any] | None = Field(default=None, description="{'metric': agreement|accuracy|cosine, "
                                                                    "'max_drop': 0.01}",
                                          examples=[{"metric": "agreement", "max_drop": 0.01}])
    promote: bool = Field(default=False, description="Make the result the default variant if within budget",
                          examples=[False])
    objective: str | None = Field(default=None, description="auto only: size | latency | balanced",
                                  examples=["latency"])


class JobPublic(BaseModel):
    id: str = Field(description="Job id (UUID)", examples=["5f0c8a3e-2b7d-4c1e-9a51-0d6f3f1c2b9a"])
    model: str = Field(description="The model it works on", examples=["digits"])
    recipe: str | dict[str, Any] = Field(description="The preset name, 'convert' for the conversion of a PyTorch "
                                                     "upload, or the custom recipe", examples=["int8-static"])
    state: str = Field(description="queued | running | succeeded | failed | cancelled", examples=["running"])
    progress: float = Field(description="0..1", examples=[0.42])
    stage: str | None = Field(description="What it is doing now, in words", examples=["calibrating"])
    created_at: datetime = Field(description="When it was asked for (UTC)", examples=[TIME_EXAMPLE])
    started_at: datetime | None = Field(description="When its last attempt started", examples=[TIME_EXAMPLE])
    finished_at: datetime | None = Field(description="When it ended", examples=[None])
    error: str | None = Field(description="Why it failed, in words", examples=[None])
    variant: str | None = Field(description="The variant it publishes ('original' for a conversion)",
                                examples=["int8-static"])
    candidates: list[dict[str, Any]] | None = Field(description="auto: every candidate's report", examples=[None])
    report: dict[str, Any] | None = Field(description="The measured report (also kept when a budget was missed)",
                                          examples=[REPORT_EXAMPLE])
    attempts: int = Field(description="Attempts so far (a lost worker's job is tried again)", examples=[1])
    promote: bool = Field(description="Make the result the default variant if within budget", examples=[False])
    dataset: str | None = Field(description="Id of the dataset it measures and calibrates on",
                                examples=[DATASET_EXAMPLE["id"]])
    cancel_requested: bool = Field(description="A cancel was asked for; a running job stops within seconds",
                                   examples=[False])


class JobsPublic(BaseModel):
    jobs: list[JobPublic] = Field(description="Newest first; each as GET /jobs/{id} gives it", examples=[[{
        "id": "5f0c8a3e-2b7d-4c1e-9a51-0d6f3f1c2b9a", "model": "digits", "recipe": "int8-dynamic",
        "state": "succeeded", "progress": 1.0, "stage": "done", "created_at": TIME_EXAMPLE, "started_at": TIME_EXAMPLE,
        "finished_at": TIME_EXAMPLE, "error": None, "variant": "int8-dynamic", "candidates": None,
        "report": REPORT_EXAMPLE, "attempts": 1, "promote": False, "dataset": DATASET_EXAMPLE["id"],
        "cancel_requested": False}]])


def job_public(row: JobRow) -> JobPublic:
    return JobPublic(
        id=row.id, model=row.model_name, recipe=row.preset or row.recipe, state=row.state, progress=row.progress,
        stage=row.stage, created_at=row.created_at, started_at=row.started_at, finished_at=row.finished_at,
        error=row.error, variant=row.variant, candidates=row.candidates, report=row.report, attempts=row.attempts,
        promote=row.promote, dataset=row.dataset_id, cancel_requested=row.cancel_requested,
    )


@router.post("/models/{name}/compressions", status_code=HTTPStatus.ACCEPTED, response_model=JobPublic)
async def compress(name: ModelName, body: CompressionCreate, services: ServicesDep, _key: Admin) -> JobPublic:
    """Start a compression job; the original keeps serving while it runs."""
    job = await asyncio.to_thread(
        services.jobs.create, model_name=name, recipe=body.recipe, dataset=body.dataset, variant=body.variant,
        budget=body.budget, promote=body.promote, objective=body.objective,
    )
    return job_public(job)


@router.get("/jobs", response_model=JobsPublic)
async def list_jobs(
    services: ServicesDep, _key: Reader,
    model: Annotated[str | None, Query(description="Only this model's jobs",
                                       openapi_examples={"digits": {"value": "digits"}})] = None,
    state: Annotated[str | None, Query(description="Only jobs in this state",
                                       openapi_examples={"running": {"value": "running"}})] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many",
                                openapi_examples={"100": {"value": 100}})] = 100,
) -> JobsPublic:
    """Jobs, newest first."""
    rows = await asyncio.to_thread(services.jobs.list, model=model, state=state, limit=limit)
    return JobsPublic(jobs=[job_public(r) for r in rows])


@router.get("/jobs/{job_id}", response_model=JobPublic)
async def get_job(job_id: JobId, services: ServicesDep, _key: Reader) -> JobPublic:
    """One job with its progress and stage."""
    return job_public(await asyncio.to_thread(services.jobs.get, job_id))


@router.delete("/jobs/{job_id}", response_model=JobPublic, status_code=HTTPStatus.ACCEPTED)
async def cancel_job(job_id: JobId, services: ServicesDep, _key: Admin) -> JobPublic:
    """Cancel: a queued job ends at once, a running one stops within seconds and leaves nothing behind."""
    return job_public(await asyncio.to_thread(services.jobs.cancel, job_id))
