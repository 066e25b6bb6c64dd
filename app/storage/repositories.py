"""Small query functions per table; keyword-only arguments, no HTTP knowledge."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, selectinload

from app.storage.tables import DatasetRow, JobRow, ModelRow, VariantRow, utcnow


def get_model(session: Session, *, name: str) -> ModelRow | None:
    query = (
        select(ModelRow)
        .where(ModelRow.name == name)
        .options(selectinload(ModelRow.variants), selectinload(ModelRow.datasets))
    )
    return session.scalars(query).one_or_none()


def list_models(session: Session) -> Sequence[ModelRow]:
    query = (
        select(ModelRow)
        .order_by(ModelRow.name)
        .options(selectinload(ModelRow.variants), selectinload(ModelRow.datasets))
    )
    return session.scalars(query).all()


def model_name_taken(session: Session, *, name: str) -> bool:
    return session.scalar(select(func.count()).select_from(ModelRow).where(ModelRow.name == name)) != 0


def artifact_in_use(session: Session, *, sha256: str) -> bool:
    """Artifacts are shared by content: a file may go only when no row points at it any more."""
    for column in (ModelRow.sha256, VariantRow.sha256, DatasetRow.sha256):
        if session.scalar(select(func.count()).where(column == sha256)):
            return True
    # A converted Hugging Face model's tokenizer is named in its config only (models of one family share it).
    for config in session.scalars(select(ModelRow.config).where(ModelRow.format == "huggingface")):
        if ((config or {}).get("text") or {}).get("tokenizer_sha256") == sha256:
            return True
    return False


def get_dataset(session: Session, *, model_id: int, dataset_id: str) -> DatasetRow | None:
    query = select(DatasetRow).where(DatasetRow.model_id == model_id, DatasetRow.id == dataset_id)
    return session.scalars(query).one_or_none()


def dataset_name_taken(session: Session, *, model_id: int, name: str) -> bool:
    query = select(func.count()).where(DatasetRow.model_id == model_id, DatasetRow.name == name)
    return session.scalar(query) != 0


def cancel_jobs_of_model(session: Session, *, model_id: int, reason: str) -> None:
    """Queued jobs end now; running ones are asked to stop (their runner sees the flag within seconds)."""
    session.execute(
        update(JobRow).where(JobRow.model_id == model_id, JobRow.state == "queued")
        .values(state="cancelled", stage=reason, finished_at=utcnow(), cancel_requested=True)
    )
    session.execute(
        update(JobRow).where(JobRow.model_id == model_id, JobRow.state == "running").values(cancel_requested=True)
    )


def job_stats(session: Session) -> tuple[dict[str, int], dict[str, list[float]]]:
    """(jobs per state, durations in seconds of succeeded jobs per recipe)."""
    counts: dict[str, int] = {str(state): int(count) for state, count in session.execute(
        select(JobRow.state, func.count()).group_by(JobRow.state)).all()}
    durations: dict[str, list[float]] = {}
    finished = session.execute(select(JobRow.preset, JobRow.started_at, JobRow.finished_at).where(
        JobRow.state == "succeeded", JobRow.started_at.is_not(None), JobRow.finished_at.is_not(None))).all()
    for preset, started, ended in finished:
        if started is not None and ended is not None:
            durations.setdefault(preset or "custom", []).append((ended - started).total_seconds())
    return counts, durations
