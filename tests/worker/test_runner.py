"""The job runner's claim: one owner at a time, takeover only from a lost worker, bounded attempts."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.compression import graph
from app.services.catalog import Catalog
from app.services.models import IncomingFile, ModelService
from app.storage.artifacts import ArtifactStore
from app.storage.db import make_engine, make_session_factory, migrate, transaction
from app.storage.tables import JobRow, utcnow
from app.worker.runner import JobRunner
from tests.helpers import MLP, MLP_SAMPLES


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[sessionmaker[Session], ArtifactStore]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    factory = make_session_factory(engine)
    store = ArtifactStore(tmp_path / "data")
    service = ModelService(session_factory=factory, store=store, catalog=Catalog(factory, 1.0),
                           providers=["CPUExecutionProvider"], enqueue=lambda _job_id: None)

    def incoming(path: Path) -> IncomingFile:
        temp = store.open_temp(max_bytes=10**8, what="t")
        temp.write(path.read_bytes())
        return IncomingFile(path.name, temp)

    service.create(name="mlp", model=incoming(MLP), samples=incoming(MLP_SAMPLES))
    yield factory, store
    store.close()
    engine.dispose()


def _job(factory: sessionmaker[Session], **values: object) -> str:
    job_id = str(uuid.uuid4())
    fields: dict[str, object] = {"state": "queued", "attempts": 0, "recipe": {"steps": [
        {"op": "quantize", "mode": "dynamic", "per_channel": False}]}, **values}
    with transaction(factory) as session:
        session.add(JobRow(id=job_id, model_id=1, model_name="mlp", preset=None, variant="q",
                           progress=0.0, promote=False, cancel_requested=False, **fields))
    return job_id


def _runner(factory: sessionmaker[Session], store: ArtifactStore, stale: float = 30.0) -> JobRunner:
    return JobRunner(session_factory=factory, store=store, max_attempts=2, heartbeat_seconds=0.2,
                     stale_seconds=stale)


def _state(factory: sessionmaker[Session], job_id: str) -> JobRow:
    with factory() as session:
        job = session.get(JobRow, job_id)
        assert job is not None
        return job


def test_two_runners_on_one_job_publish_once(world: tuple[sessionmaker[Session], ArtifactStore]) -> None:
    factory, store = world
    job_id = _job(factory)
    results: list[str] = []
    runners = [threading.Thread(target=lambda: results.append(_runner(factory, store).run(job_id)))
               for _ in range(2)]
    for thread in runners:
        thread.start()
    for thread in runners:
        thread.join()
    assert sorted(results) == ["skipped", "succeeded"]
    job = _state(factory, job_id)
    assert job.state == "succeeded" and job.attempts == 1
    assert _runner(factory, store).run(job_id) == "skipped"  # a late redelivery changes nothing


def test_a_live_owner_keeps_its_job_and_a_silent_one_loses_it(
    world: tuple[sessionmaker[Session], ArtifactStore],
) -> None:
    factory, store = world
    # Another host's worker (its process cannot be checked), heartbeat fresh: hands off.
    job_id = _job(factory, state="running", worker="elsewhere:1", heartbeat_at=utcnow(), attempts=1)
    assert _runner(factory, store).run(job_id) == "skipped"
    with transaction(factory) as session:
        session.execute(update(JobRow).where(JobRow.id == job_id).values(
            heartbeat_at=utcnow() - timedelta(seconds=60)))
    assert _runner(factory, store).run(job_id) == "succeeded"
    assert _state(factory, job_id).attempts == 2


def test_attempts_are_bounded(world: tuple[sessionmaker[Session], ArtifactStore]) -> None:
    factory, store = world
    job_id = _job(factory, state="running", worker="elsewhere:1", attempts=2,
                  heartbeat_at=utcnow() - timedelta(seconds=60))
    assert _runner(factory, store).run(job_id) == "skipped"
    job = _state(factory, job_id)
    assert job.state == "failed" and "gave up after 2 attempts" in (job.error or "")


def test_a_variant_past_the_size_limit_is_published_as_a_folder(
    world: tuple[sessionmaker[Session], ArtifactStore], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    # Protobuf's limit lowered (in this process, where the runner runs): the MLP's FP16 variant takes the path a
    # variant over 2 GB takes, its weights in a data file beside the graph.
    monkeypatch.setattr(graph, "LARGE_MODEL_BYTES", 10_000)
    monkeypatch.setattr(graph, "EXTERNAL_MIN_BYTES", 1024)
    factory, store = world
    job_id = _job(factory, recipe={"steps": [{"op": "quantize", "mode": "fp16"}]})
    assert _runner(factory, store).run(job_id) == "succeeded", _state(factory, job_id).error
    service = ModelService(session_factory=factory, store=store, catalog=Catalog(factory, 1.0),
                           providers=["CPUExecutionProvider"], enqueue=lambda _job_id: None)
    path, folder = service.artifact("mlp", "q")
    assert folder is not None and sorted(p.name for p in folder.iterdir() if p.name != "MANIFEST.json") == \
        ["model.onnx", "q.onnx.data"]
    report = _state(factory, job_id).report
    assert report is not None and report["size_bytes"] == graph.model_bytes(path)
    samples = np.load(MLP_SAMPLES)
    feed = {"input": samples["input"][:8]}
    want = ort.InferenceSession(str(MLP)).run(None, feed)[0]
    np.testing.assert_allclose(ort.InferenceSession(str(path)).run(None, feed)[0], want, atol=2e-2)
    # The job's private folder is gone: its graph and data file were moved into the store.
    assert not [p for p in (store.root / "tmp").iterdir() if p.suffix != ".lock"]
