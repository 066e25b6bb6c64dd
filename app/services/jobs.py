"""Compression jobs: check a request completely, record it, hand it to the queue; read and cancel jobs."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.compression import preflight
from app.compression.config import AUTO, Budget, DistillStep, Recipe, parse_recipe
from app.compression.errors import InvalidRecipe
from app.compression.llm.recipe import the_step
from app.errors import Conflict, InvalidContent, ModelNotFound, NotFound
from app.services.models import check_name
from app.storage import repositories
from app.storage.db import transaction
from app.storage.tables import DatasetRow, JobRow, ModelRow, utcnow

log = logging.getLogger(__name__)

FINISHED = ("succeeded", "failed", "cancelled")
OBJECTIVES = ("size", "latency", "balanced")


class JobService:
    def __init__(self, *, session_factory: sessionmaker[Session], enqueue: Callable[[str], None]) -> None:
        self._session_factory = session_factory
        self._enqueue = enqueue

    def create(
        self, *, model_name: str, recipe: Any, dataset: str | None = None, variant: str | None = None,
        budget: dict[str, Any] | None = None, promote: bool = False, objective: str | None = None,
    ) -> JobRow:
        """Everything that can be checked without running the job is checked here, so a bad request is a 4xx."""
        with self._session_factory() as session:
            model = repositories.get_model(session, name=model_name)
            if model is None:
                raise ModelNotFound(model_name)
            if model.state != "ready":
                raise Conflict(f"model '{model_name}' is {model.state}, not ready to compress"
                               + (" (its conversion job is still running)" if model.state == "converting" else ""),
                               code="model_not_ready")
            preset, parsed = _parse(recipe)
            if objective is not None and preset != AUTO:
                raise InvalidContent("'objective' applies to the 'auto' recipe only")
            if objective is not None and objective not in OBJECTIVES:
                raise InvalidContent(f"'objective' must be one of {', '.join(OBJECTIVES)}")
            checked_budget = _budget(budget)
            chosen_dataset = _dataset(model, dataset)
            _check_data_needs(model, parsed, chosen_dataset, checked_budget, session)
            problems = preflight.check((model.config or {}).get("profile") or {}, parsed, chosen_dataset is not None,
                                       chosen_dataset.samples if chosen_dataset is not None else None)
            if problems:
                raise InvalidContent(preflight.describe(problems), code="recipe_not_applicable")
            name = self._variant_name(session, model, variant, preset)
            job = JobRow(
                id=str(uuid.uuid4()), model_id=model.id, model_name=model.name,
                recipe=parsed.model_dump() if parsed is not None else {"preset": AUTO},
                preset=preset, objective=(objective or "balanced") if preset == AUTO else None,
                dataset_id=chosen_dataset.id if chosen_dataset else None, variant=name,
                budget=checked_budget.model_dump() if checked_budget else None, promote=promote,
                state="queued", progress=0.0, stage="queued", attempts=0, cancel_requested=False,
            )
        with transaction(self._session_factory) as session:
            session.add(job)
        self._enqueue(job.id)
        log.info("queued job %s: %s on %s as %s", job.id, preset or "custom recipe", model_name, name)
        return job

    @staticmethod
    def check_recipe(recipe: Any) -> None:
        """The checks that need no model: for a compression that starts after a PyTorch file is converted."""
        _parse(recipe)

    def get(self, job_id: str) -> JobRow:
        with self._session_factory() as session:
            job = session.get(JobRow, job_id)
            if job is None:
                raise NotFound(f"job '{job_id[:64]}' not found")
            return job

    def list(self, *, model: str | None = None, state: str | None = None, limit: int = 100) -> list[JobRow]:
        query = select(JobRow).order_by(JobRow.created_at.desc()).limit(limit)
        if model is not None:
            query = query.where(JobRow.model_name == model)
        if state is not None:
            query = query.where(JobRow.state == state)
        with self._session_factory() as session:
            return list(session.scalars(query).all())

    def cancel(self, job_id: str) -> JobRow:
        """A queued job is cancelled at once; a running one is asked to stop and does so within seconds."""
        job = self.get(job_id)
        if job.state in FINISHED:
            raise Conflict(f"job {job_id} already {job.state}; only queued or running jobs can be cancelled")
        with transaction(self._session_factory) as session:
            session.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.state == "queued")
                .values(state="cancelled", stage="cancelled", finished_at=utcnow(), cancel_requested=True)
            )
            session.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.state == "running").values(cancel_requested=True)
            )
        return self.get(job_id)

    def _variant_name(self, session: Session, model: ModelRow, requested: str | None, preset: str | None) -> str:
        taken = {v.name for v in model.variants}
        # Names reserved by jobs that are still queued or running, so two jobs never publish the same name.
        pending = session.scalars(
            select(JobRow.variant).where(JobRow.model_id == model.id, JobRow.state.in_(("queued", "running")))
        ).all()
        taken |= {p for p in pending if p}
        if requested is not None:
            check_name(requested, "variant name")
            if requested in taken:
                raise Conflict(f"model '{model.name}' already has (or is making) a variant named '{requested}'")
            return requested
        base = preset or "custom"
        name, counter = base, 2
        while name in taken:
            name, counter = f"{base}-{counter}", counter + 1
        return name


def _parse(recipe: Any) -> tuple[str | None, Recipe | None]:
    if recipe == AUTO:
        return AUTO, None
    if isinstance(recipe, str | dict):
        try:
            parsed = parse_recipe(recipe)
        except InvalidRecipe as exc:
            raise InvalidContent(str(exc), code="invalid_recipe") from None
        return (recipe if isinstance(recipe, str) else None), parsed
    raise InvalidContent("'recipe' must be a preset name or an object with 'steps'", code="invalid_recipe")


def _budget(raw: dict[str, Any] | None) -> Budget | None:
    if raw is None:
        return None
    try:
        return Budget.model_validate(raw)
    except Exception as exc:  # pydantic's ValidationError, worded for the user
        raise InvalidContent(f"invalid budget: {exc.errors()[0]['msg'] if hasattr(exc, 'errors') else exc}") \
            from None


def _dataset(model: ModelRow, requested: str | None) -> DatasetRow | None:
    if requested is None:
        return model.datasets[0] if model.datasets else None
    for dataset in model.datasets:
        if dataset.id == requested or dataset.name == requested:
            return dataset
    raise InvalidContent(f"model '{model.name}' has no dataset '{requested[:64]}' (datasets belong to one model)")


def _check_data_needs(
    model: ModelRow, recipe: Recipe | None, dataset: DatasetRow | None, budget: Budget | None, session: Session
) -> None:
    steps = recipe.steps if recipe is not None else []
    if (model.config or {}).get("generation") is not None:
        _check_generation_job(model, recipe, dataset, budget)
        return
    if budget is not None and budget.metric == "perplexity":
        raise InvalidContent("budget metric 'perplexity' applies to generation models (causal LMs)")
    if dataset is None:
        if any(isinstance(s, DistillStep) for s in steps):
            raise InvalidContent(
                f"distillation trains on data: upload a dataset first (POST /models/{model.name}/datasets)",
                code="dataset_required",
            )
        integer_inputs = [t["name"] for t in model.inputs if t["datatype"] not in ("FP16", "FP32", "FP64", "BOOL")]
        if integer_inputs:
            raise InvalidContent(
                f"input(s) {', '.join(integer_inputs)} are not floats, so inputs cannot be generated; upload a "
                f"dataset (POST /models/{model.name}/datasets)", code="dataset_required",
            )
    if budget is not None and budget.metric == "accuracy" and (dataset is None or not dataset.has_labels):
        raise InvalidContent("budget metric 'accuracy' needs a dataset with labels", code="labels_required")
    for step in steps:
        if isinstance(step, DistillStep) and step.student != "current":
            if repositories.get_model(session, name=step.student) is None:
                raise InvalidContent(f"distillation student '{step.student}' is not an uploaded model")


def _check_generation_job(model: ModelRow, recipe: Recipe | None, dataset: DatasetRow | None,
                          budget: Budget | None) -> None:
    """A generation model is quantized weight-only, on text, under a perplexity budget."""
    if dataset is None:
        raise InvalidContent(f"a generation model is calibrated and measured on text: upload a .txt or .jsonl dataset "
                             f"first (POST /models/{model.name}/datasets)", code="dataset_required")
    if recipe is not None:
        try:
            the_step(recipe)
        except InvalidRecipe as exc:
            raise InvalidContent(str(exc), code="invalid_recipe") from None
    if budget is not None and budget.metric != "perplexity":
        raise InvalidContent(f"a generation model's budget is on perplexity ({{\"metric\": \"perplexity\", "
                             f"\"max_increase\": 0.05}}), not {budget.metric}")
