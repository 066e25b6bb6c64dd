"""Traffic capture: a reservoir sample of real prediction inputs per model, saved as the dataset `traffic`.

Each server process keeps its own reservoir (Algorithm R) and periodically merges it into the stored one,
weighting both by how many rows each has seen, so the stored sample stays uniform over all processes' traffic.
"""

from __future__ import annotations

import io
import logging
import random
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from app.errors import InvalidContent, ModelNotFound
from app.services.catalog import Catalog
from app.services.periodic import Periodic
from app.storage import repositories
from app.storage.artifacts import ArtifactStore
from app.storage.db import transaction
from app.storage.tables import DatasetRow

log = logging.getLogger(__name__)

TRAFFIC = "traffic"
DATASET_SUFFIX = ".npz"
MAX_CAPTURE_SAMPLES = 100_000


@dataclass
class _Reservoir:
    size: int
    seen: int = 0
    rows: list[dict[str, np.ndarray]] = field(default_factory=list)
    changed: bool = False
    shapes: tuple[tuple[int, ...], ...] | None = None
    """Per-row shapes of the kept rows: rows of another shape (another sequence length) cannot be stacked."""


class TrafficCapture:
    def __init__(self, *, session_factory: sessionmaker[Session], store: ArtifactStore, catalog: Catalog,
                 flush_seconds: float) -> None:
        self._factory = session_factory
        self._store = store
        self._catalog = catalog
        self._reservoirs: dict[str, _Reservoir] = {}
        self._lock = threading.Lock()
        self._random = random.Random()
        self._periodic = Periodic("traffic capture", flush_seconds, self.flush)

    def configure(self, model: str, samples: int | None) -> dict[str, Any]:
        """Turn capture on with a sample size, or off with None; stored on the model."""
        if samples is not None and not 1 <= samples <= MAX_CAPTURE_SAMPLES:
            raise InvalidContent(f"'samples' must be between 1 and {MAX_CAPTURE_SAMPLES}")
        with transaction(self._factory) as session:
            row = repositories.get_model(session, name=model)
            if row is None:
                raise ModelNotFound(model)
            config = dict(row.config)
            config["capture"] = {"samples": samples} if samples is not None else None
            row.config = config
        self._catalog.invalidate(model)
        return {"samples": samples, "enabled": samples is not None}

    def offer(self, model: str, size: int, inputs: dict[str, np.ndarray], rows: int, batched: bool) -> None:
        """Called after a successful prediction; copies only the rows the reservoir keeps."""
        with self._lock:
            reservoir = self._reservoirs.get(model)
            if reservoir is None or reservoir.size != size:
                reservoir = self._reservoirs[model] = _Reservoir(size)
            shapes = tuple(array.shape[1:] if batched else array.shape for array in inputs.values())
            if reservoir.shapes is None:
                reservoir.shapes = shapes
            elif reservoir.shapes != shapes:
                return
            for index in range(rows if batched else 1):
                reservoir.seen += 1
                if len(reservoir.rows) < size:
                    slot = len(reservoir.rows)
                    reservoir.rows.append({})
                else:
                    slot = self._random.randrange(reservoir.seen)
                    if slot >= size:
                        continue
                row = {name: (array[index] if batched else array).copy() for name, array in inputs.items()}
                reservoir.rows[slot] = row
                reservoir.changed = True

    async def start(self) -> None:
        await self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    def flush(self) -> None:
        with self._lock:
            pending = {m: r for m, r in self._reservoirs.items() if r.changed and r.rows}
            for reservoir in pending.values():
                reservoir.changed = False
            snapshot = {m: (r.size, r.seen, list(r.rows)) for m, r in pending.items()}
            # What this process saw is handed over to the stored sample; counting restarts from zero.
            for model in pending:
                self._reservoirs[model] = _Reservoir(self._reservoirs[model].size)
        for model, (size, seen, rows) in snapshot.items():
            self._merge_and_store(model, size, seen, rows)

    def _merge_and_store(self, model: str, size: int, seen: int, rows: list[dict[str, np.ndarray]]) -> None:
        with self._factory() as session:
            row = repositories.get_model(session, name=model)
            if row is None:
                return
            stored = next((d for d in row.datasets if d.name == TRAFFIC), None)
            stored_seen = int((row.config.get("capture") or {}).get("seen", 0))
        mine = {name: np.stack([r[name] for r in rows]) for name in rows[0]}
        merged = mine
        if stored is not None:
            with np.load(self._store.local(stored.sha256, DATASET_SUFFIX), allow_pickle=False) as archive:
                theirs = {name: archive[name] for name in archive.files}
            if all(theirs[n].shape[1:] == mine[n].shape[1:] for n in mine if n in theirs):
                merged = _merge(theirs, stored_seen, mine, seen, size, self._random)
        buffer = io.BytesIO()
        np.savez(buffer, **merged)  # type: ignore[arg-type]
        sha, _ = self._store.write_bytes(buffer.getvalue(), DATASET_SUFFIX, "captured traffic")
        samples = len(next(iter(merged.values())))
        with transaction(self._factory) as session:
            current = repositories.get_model(session, name=model)
            if current is None:
                return
            for dataset in list(current.datasets):
                if dataset.name == TRAFFIC:
                    current.datasets.remove(dataset)
            session.flush()
            current.datasets.append(DatasetRow(id=str(uuid.uuid4()), name=TRAFFIC, sha256=sha,
                                               size_bytes=len(buffer.getvalue()), samples=samples, has_labels=False))
            config = dict(current.config)
            config["capture"] = {**(config.get("capture") or {"samples": size}), "seen": stored_seen + seen}
            current.config = config
        if stored is not None and stored.sha256 != sha:
            with self._factory() as session:
                if not repositories.artifact_in_use(session, sha256=stored.sha256):
                    self._store.remove(stored.sha256, DATASET_SUFFIX)
        log.info("captured traffic of %s: %d samples stored (%d rows seen)", model, samples, stored_seen + seen)


def _merge(a: dict[str, np.ndarray], seen_a: int, b: dict[str, np.ndarray], seen_b: int, size: int,
           rng: random.Random) -> dict[str, np.ndarray]:
    """Two uniform samples of disjoint streams -> one uniform sample of both, in proportion to their counts."""
    len_a, len_b = len(next(iter(a.values()))), len(next(iter(b.values())))
    total = min(size, len_a + len_b)
    share_a = seen_a / max(seen_a + seen_b, 1)
    take_a = min(len_a, max(total - len_b, round(total * share_a)))
    take_b = min(len_b, total - take_a)
    pick_a = sorted(rng.sample(range(len_a), take_a))
    pick_b = sorted(rng.sample(range(len_b), take_b))
    return {name: np.concatenate([a[name][pick_a], b[name][pick_b]]) for name in b if name in a}
