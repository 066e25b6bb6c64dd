"""Routing: which variant answers (default, canary split), and shadow traffic measured against the answer."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.errors import InvalidContent, ModelNotFound
from app.metrics import Metrics
from app.services.catalog import Catalog, ModelEntry
from app.services.periodic import Periodic
from app.storage import repositories
from app.storage.db import transaction
from app.storage.tables import ShadowStatsRow

log = logging.getLogger(__name__)

ShadowRun = Callable[[str, str, dict[str, np.ndarray], str], Awaitable[tuple[np.ndarray, float]]]


def _draw(request_id: str | None, salt: str) -> float:
    """A number in [0, 1): fixed for a request id (a retry lands on the same variant), random without one."""
    if request_id is None:
        return random.random()
    digest = hashlib.blake2b(f"{salt}:{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def choose(entry: ModelEntry, request_id: str | None) -> tuple[str, str | None]:
    """(variant that answers, shadow variant or None) for a request that names no variant."""
    routing = entry.routing
    chosen = entry.default_variant
    canary = routing.get("canary")
    if canary and _draw(request_id, "canary") * 100 < float(canary["percent"]):
        chosen = str(canary["variant"])
    shadow = routing.get("shadow")
    if shadow and shadow["variant"] != chosen and random.random() * 100 < float(shadow["percent"]):
        return chosen, str(shadow["variant"])
    return chosen, None


def validate_routing(body: dict[str, Any], variants: set[str]) -> dict[str, Any]:
    default = body.get("default")
    if not isinstance(default, str) or default not in variants:
        raise InvalidContent(f"'default' must name a variant of the model ({', '.join(sorted(variants))})")
    routing: dict[str, Any] = {"default": default, "canary": None, "shadow": None}
    for kind in ("canary", "shadow"):
        part = body.get(kind)
        if part is None:
            continue
        if not isinstance(part, dict) or set(part) != {"variant", "percent"}:
            raise InvalidContent(f"'{kind}' must be null or {{\"variant\": name, \"percent\": 0-100}}")
        if part["variant"] not in variants:
            raise InvalidContent(f"{kind} variant '{str(part['variant'])[:64]}' does not exist")
        if part["variant"] == default:
            raise InvalidContent(f"the {kind} variant must differ from the default variant")
        percent = part["percent"]
        if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 <= percent <= 100:
            raise InvalidContent(f"{kind} percent must be a number from 0 to 100")
        routing[kind] = {"variant": part["variant"], "percent": float(percent)}
    unknown = set(body) - {"default", "canary", "shadow"}
    if unknown:
        raise InvalidContent(f"unknown routing field(s): {', '.join(sorted(unknown))}")
    return routing


@dataclass
class _Sums:
    requests: int = 0
    rows: int = 0
    agreement: float = 0.0
    cosine: float = 0.0
    classifier: bool = False
    primary_seconds: float = 0.0
    shadow_seconds: float = 0.0


def _accumulate(target: _Sums, other: _Sums) -> None:
    target.requests += other.requests
    target.rows += other.rows
    target.agreement += other.agreement
    target.cosine += other.cosine
    target.classifier = other.classifier
    target.primary_seconds += other.primary_seconds
    target.shadow_seconds += other.shadow_seconds


class ShadowTraffic:
    """Runs shadow requests after the answer has gone out and keeps the comparison, per (model, variant)."""

    def __init__(self, *, session_factory: sessionmaker[Session], metrics: Metrics, max_in_flight: int,
                 flush_seconds: float = 2.0) -> None:
        self._factory = session_factory
        self._metrics = metrics
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._pending: dict[tuple[str, str], _Sums] = {}
        self._totals: dict[tuple[str, str], _Sums] = {}
        self._lock = threading.Lock()
        self._periodic = Periodic("shadow statistics", flush_seconds, self.flush)
        self._background: set[asyncio.Task[None]] = set()

    def submit(self, *, model: str, variant: str, inputs: dict[str, np.ndarray], output: str,
               answer: np.ndarray, primary_seconds: float, run: ShadowRun) -> None:
        """Never blocks the answer; when too many shadows are in flight, this one is skipped."""
        if self._in_flight >= self._max_in_flight:
            return
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(
            self._compare(model, variant, inputs, output, answer, primary_seconds, run))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def submit_generation(self, *, model: str, variant: str, primary_seconds: float,
                          run: Callable[[], Awaitable[tuple[int, int, float]]]) -> None:
        """A generation's shadow: `run` scores the answered tokens with the shadow variant and returns (matching
        greedy tokens, tokens, seconds); kept as token agreement."""
        if self._in_flight >= self._max_in_flight:
            return
        self._in_flight += 1

        async def compare() -> None:
            try:
                matches, tokens, seconds = await run()
                self._add_sums(model, variant, _Sums(1, tokens, float(matches), float(matches), True,
                                                     primary_seconds, seconds))
            except Exception:
                log.warning("shadow generation on %s/%s failed", model, variant, exc_info=True)
            finally:
                self._in_flight -= 1

        task = asyncio.get_running_loop().create_task(compare())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _compare(self, model: str, variant: str, inputs: dict[str, np.ndarray], output: str,
                       answer: np.ndarray, primary_seconds: float, run: ShadowRun) -> None:
        try:
            shadow, seconds = await run(model, variant, inputs, output)
            self.record(model, variant, answer, shadow, primary_seconds, seconds)
        except Exception:
            log.warning("shadow request to %s/%s failed", model, variant, exc_info=True)
        finally:
            self._in_flight -= 1

    def record(self, model: str, variant: str, answer: np.ndarray, shadow: np.ndarray, primary_seconds: float,
               shadow_seconds: float) -> None:
        a = answer.reshape(len(answer), -1).astype(np.float64) if answer.ndim else answer.reshape(1, -1)
        b = shadow.reshape(len(shadow), -1).astype(np.float64) if shadow.ndim else shadow.reshape(1, -1)
        classifier = answer.ndim == 2 and answer.shape[1] > 1 and answer.dtype.kind == "f"
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosine = np.where(norms > 0, np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1), 1.0)
        agreement = float(np.sum(a.argmax(axis=1) == b.argmax(axis=1))) if classifier else float(np.sum(cosine))
        self._add_sums(model, variant, _Sums(1, len(a), agreement, float(np.sum(cosine)), classifier,
                                             primary_seconds, shadow_seconds))

    def _add_sums(self, model: str, variant: str, one: _Sums) -> None:
        with self._lock:
            for table in (self._pending, self._totals):
                _accumulate(table.setdefault((model, variant), _Sums()), one)
            totals = self._totals[(model, variant)]
        self._metrics.shadow_agreement.labels(model, variant).set(totals.agreement / max(totals.rows, 1))

    async def start(self) -> None:
        await self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for (model, variant), sums in pending.items():
            try:
                self._add(model, variant, sums)
            except Exception:
                with self._lock:  # kept for the next flush
                    _accumulate(self._pending.setdefault((model, variant), _Sums()), sums)
                raise

    def _add(self, model: str, variant: str, sums: _Sums) -> None:
        values = {
            "requests": ShadowStatsRow.requests + sums.requests, "rows": ShadowStatsRow.rows + sums.rows,
            "agreement_sum": ShadowStatsRow.agreement_sum + sums.agreement,
            "cosine_sum": ShadowStatsRow.cosine_sum + sums.cosine, "classifier": sums.classifier,
            "primary_seconds": ShadowStatsRow.primary_seconds + sums.primary_seconds,
            "shadow_seconds": ShadowStatsRow.shadow_seconds + sums.shadow_seconds,
        }
        for _ in range(2):
            with transaction(self._factory) as session:
                row = repositories.get_model(session, name=model)
                if row is None:
                    return
                # Additive UPDATE: every process adds its share; no read-modify-write race.
                result = session.execute(update(ShadowStatsRow).where(
                    ShadowStatsRow.model_id == row.id, ShadowStatsRow.variant == variant).values(**values))
                changed = int(getattr(result, "rowcount", 0))
                if changed:
                    return
            try:
                with transaction(self._factory) as session:
                    session.add(ShadowStatsRow(
                        model_id=row.id, variant=variant, requests=sums.requests, rows=sums.rows,
                        agreement_sum=sums.agreement, cosine_sum=sums.cosine, classifier=sums.classifier,
                        primary_seconds=sums.primary_seconds, shadow_seconds=sums.shadow_seconds))
                return
            except IntegrityError:
                continue  # another process inserted it first: add to theirs


def shadow_summary(session: Session, model_id: int) -> dict[str, Any]:
    rows = session.scalars(select(ShadowStatsRow).where(ShadowStatsRow.model_id == model_id)).all()
    return {
        row.variant: {
            "requests": row.requests, "rows": row.rows,
            "metric": "agreement" if row.classifier else "cosine",
            "agreement": round(row.agreement_sum / row.rows, 6) if row.rows else None,
            "cosine_mean": round(row.cosine_sum / row.rows, 6) if row.rows else None,
            "answer_latency_ms": round(row.primary_seconds / row.requests * 1e3, 4) if row.requests else None,
            "shadow_latency_ms": round(row.shadow_seconds / row.requests * 1e3, 4) if row.requests else None,
        }
        for row in rows
    }


class RoutingService:
    def __init__(self, *, session_factory: sessionmaker[Session], catalog: Catalog) -> None:
        self._factory = session_factory
        self._catalog = catalog

    def update(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        with transaction(self._factory) as session:
            row = repositories.get_model(session, name=model)
            if row is None:
                raise ModelNotFound(model)
            routing = validate_routing(body, {v.name for v in row.variants})
            row.routing = routing
        self._catalog.invalidate(model)
        log.info("routing of %s set to %s at %s", model, routing, time.strftime("%H:%M:%S"))
        return routing

    def shadow_stats(self, model: str) -> dict[str, Any]:
        with self._factory() as session:
            row = repositories.get_model(session, name=model)
            if row is None:
                raise ModelNotFound(model)
            return shadow_summary(session, row.id)
