"""Runs one compression job wherever it is called (embedded child process or Celery task): claim, compress,
publish the variant atomically, or record why not."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.compression import data as model_data
from app.compression.config import AUTO, Budget, Recipe
from app.compression.errors import Cancelled, CompressionError
from app.compression.evaluate import renamed
from app.compression.graph import io_info, model_files, rename_external_data
from app.compression.llm.recipe import LlmResult, run_llm_recipe, search_llm, token_sequences
from app.compression.progress import CancelToken
from app.compression.recipes import Checkpoint, run_recipe
from app.compression.search import Objective, search
from app.errors import SlimServeError
from app.services.models import CONVERT, ORIGINAL, commit_onnx
from app.services.text import TOKENIZER_SUFFIX
from app.storage import repositories
from app.storage.artifacts import MODEL_FOLDER, ArtifactStore
from app.storage.db import rowcount, transaction
from app.storage.tables import DatasetRow, JobRow, ModelRow, VariantRow, utcnow
from app.text.datasets import LABELS, TEXT, token_arrays
from app.text.tokenizer import TextTokenizer
from app.worker.conversion import ConversionRunner, mark_model_failed

log = logging.getLogger(__name__)

MODEL_SUFFIX = ".onnx"
DATASET_SUFFIX = ".npz"
CHECKPOINT_SUFFIX = ".ckpt"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_is_dead(worker: str | None) -> bool:
    """True only when the worker ran on this host and its process is gone; other hosts are judged by heartbeat."""
    if not worker:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class _Heartbeat(threading.Thread):
    """Writes progress and a heartbeat while the job runs, and turns a cancel request into a cancelled token.

    A thread, because some stages (calibration, a long epoch) call back rarely; silence would look like death.
    """

    def __init__(self, factory: sessionmaker[Session], job_id: str, me: str, interval: float) -> None:
        super().__init__(name=f"heartbeat-{job_id[:8]}", daemon=True)
        self._factory, self._job_id, self._me, self._interval = factory, job_id, me, interval
        self.token = CancelToken()
        self.progress, self.stage = 0.0, "starting"
        self._stop = threading.Event()

    def report(self, fraction: float, stage: str) -> None:
        self.progress, self.stage = fraction, stage[:128]
        self.token.check()

    def run(self) -> None:
        while not self._stop.wait(self._interval):
            self.beat()

    def beat(self) -> None:
        try:
            with transaction(self._factory) as session:
                session.execute(
                    update(JobRow).where(JobRow.id == self._job_id, JobRow.worker == self._me,
                                         JobRow.state == "running")
                    .values(progress=round(self.progress, 4), stage=self.stage, heartbeat_at=utcnow())
                )
                if session.scalar(select(JobRow.cancel_requested).where(JobRow.id == self._job_id)):
                    self.token.cancel()
        except Exception:  # the database may blink; the job itself must not die of it
            log.warning("heartbeat of job %s failed", self._job_id, exc_info=True)

    def stop(self) -> None:
        self._stop.set()


class JobRunner:
    def __init__(
        self, *, session_factory: sessionmaker[Session], store: ArtifactStore, max_attempts: int,
        heartbeat_seconds: float, stale_seconds: float, threads: int = 1,
        enqueue: Callable[[str], None] | None = None,
    ) -> None:
        self._factory = session_factory
        self._store = store
        self._max_attempts = max_attempts
        self._heartbeat_seconds = heartbeat_seconds
        self._stale = timedelta(seconds=stale_seconds)
        self._threads = threads
        self._me = worker_id()
        self._conversions = ConversionRunner(session_factory=session_factory, store=store, me=self._me,
                                             enqueue=enqueue)

    def run(self, job_id: str) -> str:
        """Returns the job's state afterwards; 'skipped' when another worker owns it or it is finished."""
        job = self._claim(job_id)
        if job is None:
            return "skipped"
        heartbeat = _Heartbeat(self._factory, job_id, self._me, self._heartbeat_seconds)
        heartbeat.start()
        # A private folder: a variant past 2 GB is written as a graph and a data file, and two jobs' data files
        # must never meet.
        workspace = self._store.temp_path(".job")
        workspace.mkdir()
        output = workspace / f"model{MODEL_SUFFIX}"
        pinned: list[Path] = []
        started = time.monotonic()
        try:
            if job.preset == CONVERT:
                state = self._conversions.run(job, output, heartbeat.report, lambda path: self._pin(path, pinned))
            else:
                result = self._compress(job, output, heartbeat, pinned)
                state = self._publish(job, output, result, time.monotonic() - started)
        except Cancelled:
            state = self._finish(job_id, "cancelled", error=None, stage="cancelled")
        except Exception as exc:
            heartbeat.beat()
            if heartbeat.token.cancelled:
                # Asked to stop (or its model was deleted): whatever broke on the way out is not the story.
                state = self._finish(job_id, "cancelled", error=None, stage="cancelled")
            elif isinstance(exc, CompressionError):
                state = self._finish(job_id, "failed", error=exc.describe(), stage="failed")
            elif isinstance(exc, SlimServeError):
                state = self._finish(job_id, "failed", error=str(exc), stage="failed")
            else:
                log.exception("job %s failed unexpectedly", job_id)
                state = self._finish(job_id, "failed", error=f"internal error: {type(exc).__name__}: {exc}",
                                     stage="failed")
        finally:
            heartbeat.stop()
            shutil.rmtree(workspace, ignore_errors=True)
            for path in pinned:
                self._store.unpin(path)
        if state in ("succeeded", "failed", "cancelled"):
            self._drop_checkpoint(job_id)
        if state == "succeeded" and job.preset == CONVERT:
            self._conversions.start_requested_compression(job)
        log.info("job %s %s after %.1f s", job_id, state, time.monotonic() - started)
        return state

    def _claim(self, job_id: str) -> JobRow | None:
        """Atomically take a queued job, or a running one whose worker is gone; one winner, always."""
        with self._factory() as session:
            job = session.get(JobRow, job_id)
            if job is None or job.state not in ("queued", "running"):
                return None
            if job.state == "running" and not pid_is_dead(job.worker) and job.heartbeat_at is not None \
                    and utcnow() - job.heartbeat_at < self._stale:
                return None
            if job.attempts >= self._max_attempts:
                self._finish(job_id, "failed", stage="failed", any_owner=True, error=(
                    f"gave up after {job.attempts} attempts: the worker running it was lost each time "
                    "(killed, or out of memory)"))
                return None
            previous = (job.state, job.worker, job.attempts)
        now = utcnow()
        with transaction(self._factory) as session:
            claimed = rowcount(session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.state == previous[0], JobRow.attempts == previous[2],
                       or_(JobRow.worker.is_(None), JobRow.worker == previous[1]), JobRow.cancel_requested.is_(False))
                .values(state="running", attempts=previous[2] + 1, worker=self._me, heartbeat_at=now,
                        started_at=now, stage="starting", progress=0.0, error=None)
            ))
        if not claimed:
            return None
        with self._factory() as session:
            return session.get(JobRow, job_id)

    def _compress(self, job: JobRow, output: Path, heartbeat: _Heartbeat, pinned: list[Path]) -> Any:
        with self._factory() as session:
            model = session.get(ModelRow, job.model_id) if job.model_id is not None else None
            if model is None:
                raise CompressionError(f"model '{job.model_name}' was deleted before the job ran")
            if model.state != "ready":
                raise CompressionError(f"model '{model.name}' is {model.state}, not ready to compress")
            original = self._pin(self._store.model(_original_sha(model)), pinned)
            dataset = session.get(DatasetRow, job.dataset_id) if job.dataset_id else None
            dataset_path = self._pin(self._store.local(dataset.sha256, DATASET_SUFFIX), pinned) if dataset else None
            dataset_name = dataset.name if dataset else None
            text = (model.config or {}).get("text")
            generation = (model.config or {}).get("generation")
        if generation is not None:
            return self._compress_generation(job, original.parent, dataset_path, dataset_name, heartbeat)
        inputs, _ = io_info(original)
        data = self._dataset(dataset_path, inputs, text) if dataset_path else None
        budget = Budget.model_validate(job.budget) if job.budget else None
        if job.preset == AUTO:
            objective: Objective = job.objective if job.objective in ("size", "latency") else "balanced"  # type: ignore[assignment]
            return search(original=original, output=output, data=data, budget=budget, objective=objective,
                          progress=heartbeat.report, cancel=heartbeat.token, threads=self._threads,
                          resolve_model=self._resolve_model)
        resume = self._resume(job, pinned)
        result = run_recipe(original=original, output=output, recipe=Recipe.model_validate(job.recipe), data=data,
                            budget=budget, progress=heartbeat.report, cancel=heartbeat.token, threads=self._threads,
                            resolve_model=self._resolve_model, resume=resume,
                            on_step=lambda checkpoint: self._save_checkpoint(job.id, checkpoint))
        if resume is not None:
            result.report["resumed_from_step"] = resume.done + 1
        return result

    def _compress_generation(self, job: JobRow, original: Path, dataset: Path | None, dataset_name: str | None,
                             heartbeat: _Heartbeat) -> LlmResult:
        """A generation model's genai folder, quantized weight-only (or searched) and measured on text."""
        if dataset is None:
            raise CompressionError("a generation model is calibrated and measured on text: upload a .txt or .jsonl "
                                   "dataset first")
        with np.load(dataset, allow_pickle=False) as archive:
            texts = [str(t) for t in archive[TEXT]]
        sequences = token_sequences(original, texts, f"dataset '{dataset_name}'")
        output = self._store.temp_path(".genai")
        output.mkdir()
        budget = Budget.model_validate(job.budget) if job.budget else None
        if job.preset == AUTO:
            return search_llm(original, output / "variant", sequences, budget=budget, progress=heartbeat.report,
                              cancel=heartbeat.token, threads=self._threads)
        return run_llm_recipe(original, output / "variant", Recipe.model_validate(job.recipe), sequences,
                              budget=budget, progress=heartbeat.report, cancel=heartbeat.token,
                              threads=self._threads)

    def _dataset(self, path: Path, inputs: list[Any], text: dict[str, Any] | None) -> model_data.ModelData:
        """The dataset as the model's inputs: a text dataset (texts kept as text) is tokenized here, with the
        model's own tokenizer, padded to its longest text."""
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
        if text is None or TEXT not in names:
            return model_data.from_npz(path, inputs)
        with np.load(path, allow_pickle=False) as archive:
            texts = [str(t) for t in archive[TEXT]]
            labels = archive[LABELS] if LABELS in names else None
        tokenizer = TextTokenizer(self._store.local(text["tokenizer_sha256"], TOKENIZER_SUFFIX),
                                  inputs=list(text["inputs"]), max_length=int(text["max_length"]),
                                  pad_id=int(text["pad_id"]))
        arrays, _ = token_arrays(texts, tokenizer)
        return model_data.from_arrays(arrays, inputs, labels)

    def _resume(self, job: JobRow, pinned: list[Path]) -> Checkpoint | None:
        saved = job.checkpoint
        if not saved:
            return None
        try:
            model = self._pin(self._store.local(saved["sha256"], CHECKPOINT_SUFFIX), pinned)
        except OSError:
            log.warning("checkpoint of job %s is gone; starting from the first step", job.id)
            return None
        log.info("job %s resumes at step %d", job.id, saved["done"] + 1)
        return Checkpoint(done=int(saved["done"]), model=model, notes=list(saved["notes"]),
                          normalize=saved.get("normalize"))

    def _save_checkpoint(self, job_id: str, checkpoint: Checkpoint) -> None:
        """Keep the model after each finished step, so a crash costs at most the step in progress."""
        if len(model_files(checkpoint.model)) > 1:
            # Copying gigabytes after every step would cost more than the steps a crash makes us redo.
            log.info("job %s: no checkpoint for a model with external data; a restart begins again", job_id)
            return
        copy = self._store.temp_path(CHECKPOINT_SUFFIX)
        shutil.copyfile(checkpoint.model, copy)
        sha, _, _ = self._store.adopt(copy, CHECKPOINT_SUFFIX)
        with transaction(self._factory) as session:
            previous = session.scalar(select(JobRow.checkpoint).where(JobRow.id == job_id))
            session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.worker == self._me).values(
                checkpoint={"done": checkpoint.done, "sha256": sha, "notes": checkpoint.notes,
                            "normalize": checkpoint.normalize}))
        if previous and previous.get("sha256") != sha:
            self._store.remove(previous["sha256"], CHECKPOINT_SUFFIX)

    def _drop_checkpoint(self, job_id: str) -> None:
        with transaction(self._factory) as session:
            saved = session.scalar(select(JobRow.checkpoint).where(JobRow.id == job_id))
            session.execute(update(JobRow).where(JobRow.id == job_id).values(checkpoint=None))
        if saved:
            self._store.remove(saved["sha256"], CHECKPOINT_SUFFIX)

    def _pin(self, path: Path, pinned: list[Path]) -> Path:
        """A private hard link (or a folder of them): deleting the model meanwhile cannot pull it from the job."""
        private = self._store.pin(path)
        pinned.append(private)
        return private

    def _resolve_model(self, name: str) -> Path:
        with self._factory() as session:
            row = repositories.get_model(session, name=name)
            if row is None:
                raise CompressionError(f"model '{name}' does not exist")
            return self._store.model(_original_sha(row))

    def _publish(self, job: JobRow, output: Path, result: Any, seconds: float) -> str:
        report: dict[str, Any] | None = result.report
        candidates = getattr(result, "candidates", None)
        if job.preset == AUTO and result.output is None:
            return self._finish(job.id, "failed", stage="failed", candidates=candidates, error=(
                "every candidate failed: " + "; ".join(_candidate_summary(c) for c in candidates or [])))
        assert report is not None
        if job.promote and not report["within_budget"]:
            return self._finish(job.id, "failed", stage="failed", report=report, candidates=candidates, error=(
                f"not promoted and not kept: the result misses the budget ({_budget_summary(report)}); "
                "the model is unchanged"))
        if job.promote and job.preset == AUTO and not getattr(result, "within_budget", True):
            return self._finish(job.id, "failed", stage="failed", report=report, candidates=candidates, error=(
                "not promoted and not kept: no candidate met both the budget and the objective "
                f"('{job.objective}'); the model is unchanged"))
        if isinstance(result, LlmResult):  # a genai folder: graph, weights, config and tokenizer together
            assert result.output is not None
            try:
                sha, size, _ = self._store.commit_folder(result.output, MODEL_FOLDER)
            finally:
                shutil.rmtree(result.output.parent, ignore_errors=True)
        else:
            # One file, or past 2 GB a folder: the graph and the weights file the compression wrote beside it.
            if rename_external_data(output, f"{job.variant}.onnx.data"):
                renamed(report, output)
            sha, size, _ = commit_onnx(self._store, output, output.parent)
            sidecar = output.with_suffix(".recipe.json")
            if sidecar.is_file():
                self._store.adopt(sidecar, ".json")
        recipe = job.recipe if job.preset != AUTO else {"preset": AUTO, "winner": getattr(result, "winner", None)}
        try:
            with transaction(self._factory) as session:
                owned = rowcount(session.execute(
                    update(JobRow).where(JobRow.id == job.id, JobRow.worker == self._me, JobRow.state == "running",
                                         JobRow.cancel_requested.is_(False))
                    .values(state="succeeded", progress=1.0, stage="done", finished_at=utcnow(), report=report,
                            candidates=candidates, error=None)
                ))
                if not owned:
                    raise Cancelled("the job was cancelled or taken over before it could publish")
                model = session.get(ModelRow, job.model_id)
                if model is None:
                    raise CompressionError(f"model '{job.model_name}' was deleted while the job ran")
                session.add(VariantRow(model_id=model.id, name=job.variant, recipe=recipe, parent="original",
                                       sha256=sha, size_bytes=size, report=report))
                if job.promote:
                    model.routing = {**model.routing, "default": job.variant}
        except IntegrityError:
            return self._finish(job.id, "failed", stage="failed", error=(
                f"a variant named '{job.variant}' appeared while the job ran; nothing was published"))
        except Cancelled:
            self._drop_if_unused(sha)
            raise
        log.info("published %s/%s (%d bytes) in %.1f s", job.model_name, job.variant, size, seconds)
        return "succeeded"

    def _drop_if_unused(self, sha: str) -> None:
        with self._factory() as session:
            if not repositories.artifact_in_use(session, sha256=sha):
                self._store.remove_model(sha)

    def _finish(self, job_id: str, state: str, *, error: str | None, stage: str,
                report: dict[str, Any] | None = None, candidates: list[dict[str, Any]] | None = None,
                any_owner: bool = False) -> str:
        # Only the owner may finish a running job: a worker that lost it must not overwrite the new owner's work.
        owned = JobRow.state.in_(("queued", "running")) if any_owner else or_(
            JobRow.state == "queued", and_(JobRow.state == "running", JobRow.worker == self._me))
        with transaction(self._factory) as session:
            finished = rowcount(session.execute(
                update(JobRow).where(JobRow.id == job_id, owned)
                .values(state=state, stage=stage, error=error, finished_at=utcnow(), report=report,
                        candidates=candidates)
            ))
            job = session.get(JobRow, job_id)
            if finished and job is not None and job.preset == CONVERT and job.model_id is not None:
                mark_model_failed(session, job.model_id, error or f"the conversion was {state}")
        return state


def _original_sha(model: ModelRow) -> str:
    """The ONNX file of the original variant (for a converted PyTorch upload, not the uploaded file)."""
    for variant in model.variants:
        if variant.name == ORIGINAL:
            return variant.sha256
    raise CompressionError(f"model '{model.name}' has no original variant yet ({model.state})")


def _budget_summary(report: dict[str, Any]) -> str:
    budget, fidelity = report.get("budget") or {}, report["fidelity"]
    metric = budget.get("metric", "agreement")
    if metric == "perplexity":
        return (f"perplexity {fidelity.get('perplexity')} against {fidelity.get('original_perplexity')}, an increase "
                f"of {fidelity.get('perplexity_increase')} with max increase {budget.get('max_increase')}")
    value = {"agreement": fidelity.get("agreement"), "cosine": fidelity.get("cosine_mean"),
             "accuracy": fidelity.get("accuracy")}.get(metric)
    return f"{metric} {value} with max drop {budget.get('max_drop')}"


def _candidate_summary(candidate: dict[str, Any]) -> str:
    if candidate.get("error"):
        return f"{candidate['name']}: {candidate['error']}"
    report = candidate["report"]
    return (f"{candidate['name']}: size {report['size_ratio']}x, speedup {report['speedup']}, "
            f"{_budget_summary(report)}, {'within' if report['within_budget'] else 'over'} budget")
