"""Per-process cache of what each model serves: specs, variants, routing; refreshed after a short TTL."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.errors import ModelNotFound, NotReady
from app.runtime.datatypes import TensorSpec
from app.runtime.sessions import SessionOptions
from app.storage import repositories
from app.storage.tables import ModelRow


@dataclass(frozen=True, slots=True)
class VariantEntry:
    name: str
    sha256: str
    size_bytes: int
    session_config: tuple[tuple[str, str], ...] = ()
    """onnxruntime config entries the variant was measured with and must be served with."""


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    state: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    routing: dict[str, Any]
    variants: dict[str, VariantEntry]
    loaded_at: float
    capture_samples: int | None = None
    """Reservoir size when traffic capture is on."""
    session_options: dict[str, SessionOptions] = field(default_factory=dict)
    """Per-variant onnxruntime options (threads, optimization level)."""
    batching: dict[str, Any] | None = None
    """Dynamic batching settings; None when off or impossible (an input or output without a batch axis)."""
    text: dict[str, Any] | None = None
    """A text model's tokenizer and task settings: clients send texts, the session takes token tensors."""
    generation: dict[str, Any] | None = None
    """A generation model's context length, chat template and special tokens; served by GenerationService."""

    @property
    def default_variant(self) -> str:
        return str(self.routing.get("default") or "original")


def entry_from_row(row: ModelRow, now: float) -> ModelEntry:
    return ModelEntry(
        name=row.name,
        state=row.state,
        inputs={spec["name"]: TensorSpec.from_json(spec) for spec in row.inputs},
        outputs={spec["name"]: TensorSpec.from_json(spec) for spec in row.outputs},
        routing=dict(row.routing),
        variants={v.name: VariantEntry(v.name, v.sha256, v.size_bytes, tuple(sorted(
            ((v.report or {}).get("session_config") or {}).items()))) for v in row.variants},
        loaded_at=now,
        capture_samples=(row.config.get("capture") or {}).get("samples"),
        batching=batching_settings(row),
        session_options={variant: SessionOptions(**options)
                         for variant, options in (row.config.get("sessions") or {}).items()},
        text=row.config.get("text"),
        generation=row.config.get("generation"),
    )


DEFAULT_BATCHING = {"enabled": True, "max_batch_size": 64, "max_queue_delay_ms": 0.0}


def can_batch(row: ModelRow) -> bool:
    return all(spec["shape"] and spec["shape"][0] == -1 for spec in [*row.inputs, *row.outputs])


def batching_settings(row: ModelRow) -> dict[str, Any] | None:
    settings = {**DEFAULT_BATCHING, **(row.config.get("batching") or {})}
    return settings if settings["enabled"] and can_batch(row) else None


class Catalog:
    """Reads models from the database at most once per TTL per process; writers invalidate at once."""

    def __init__(self, session_factory: sessionmaker[Session], ttl_seconds: float) -> None:
        self._session_factory = session_factory
        self._ttl = ttl_seconds
        self._entries: dict[str, ModelEntry] = {}

    async def get(self, name: str) -> ModelEntry:
        entry = self._entries.get(name)
        if entry is None or time.monotonic() - entry.loaded_at > self._ttl:
            try:
                entry = await asyncio.to_thread(self.load, name)
            except SQLAlchemyError:
                if entry is None:
                    raise NotReady("the metadata database is unavailable") from None
                # Keep serving what this process knows; try the database again after another TTL.
                entry = replace(entry, loaded_at=time.monotonic())
                self._entries[name] = entry
        if entry.state != "ready":
            raise NotReady(f"model '{name}' is {entry.state}, not ready to serve")
        return entry

    def load(self, name: str) -> ModelEntry:
        with self._session_factory() as session:
            row = repositories.get_model(session, name=name)
            if row is None:
                self._entries.pop(name, None)
                raise ModelNotFound(name)
            entry = entry_from_row(row, time.monotonic())
        self._entries[name] = entry
        return entry

    def invalidate(self, name: str) -> None:
        self._entries.pop(name, None)
