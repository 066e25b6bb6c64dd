"""Service configuration, read from `SLIMSERVE_*` environment variables; defaults run embedded."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Role = Literal["admin", "predict"]


class ApiKey(BaseModel):
    """One configured key: its secret, its role and a short id that is safe to log."""

    key_id: str
    role: Role
    secret: str


class PreloadModel(BaseModel):
    """A model registered at start-up when its name is not taken yet (the example model)."""

    file: Path
    samples: Path | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SLIMSERVE_", env_nested_delimiter="__", extra="ignore", env_ignore_empty=True
    )

    host: str = "127.0.0.1"
    """Address the HTTP server binds to."""
    port: int = Field(default=8000, ge=0, le=65535)
    """Port the HTTP server listens on."""
    grpc_port: int = Field(default=8001, ge=0, le=65535)
    """Port of the Open Inference Protocol over gRPC, on the same host; 0 turns gRPC off."""
    grpc_share_port: bool = False
    """Set by `slimserve serve --workers N`: every server process binds the gRPC port (SO_REUSEPORT)."""
    data_dir: Path = Path("var")
    """Directory for artifacts, temporary uploads and (by default) the SQLite database."""
    storage_url: str | None = None
    """Shared artifact storage every node sees, as an fsspec URL (s3://bucket/prefix); data_dir is then a cache."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """JSON options for the fsspec filesystem (e.g. {"client_kwargs": {"endpoint_url": ...}})."""
    database_url: str | None = None
    """SQLAlchemy URL of the metadata database; default: SQLite file `<data_dir>/slimserve.db`."""
    api_keys: Annotated[list[ApiKey], NoDecode] = Field(default_factory=list)
    """Comma-separated keys, each `KEY` (admin) or `admin:KEY` / `predict:KEY`. Empty: no auth."""
    allow_insecure: bool = False
    """Allow binding to a non-loopback address without any API key."""
    public_metrics: bool = True
    """Serve `/metrics` without an API key."""
    public_health: bool = True
    """Serve `/v2/health/live` and `/v2/health/ready` without an API key (orchestrators probe them)."""
    max_upload_bytes: int = Field(default=1024**4, gt=0)
    """Largest accepted model upload (whole multipart body), in bytes; the free disk is checked first anyway."""
    max_unpacked_bytes: int = Field(default=1024**4, gt=0)
    """Largest total an uploaded archive (.zip, .tar, .tar.gz) may unpack to, in bytes."""
    max_archive_members: int = Field(default=10_000, gt=0)
    """Most files and folders an uploaded archive may hold."""
    max_request_bytes: int = Field(default=64 * 1024**2, gt=0)
    """Largest accepted prediction request body, in bytes."""
    max_batch_size: int = Field(default=1024, gt=0)
    """Largest first dimension accepted in one prediction for models with a dynamic batch axis."""
    max_tensor_elements: int = Field(default=16 * 1024**2, gt=0)
    """Largest number of elements in one input tensor of a prediction."""
    intra_op_threads: int = Field(default=1, ge=0)
    """onnxruntime intra-op threads per session (0: onnxruntime's default, all cores)."""
    max_concurrent_inferences: int = Field(default_factory=lambda: os.cpu_count() or 1, gt=0)
    """Inferences running at once in this process (size of the inference thread pool)."""
    max_loaded_bytes: int | None = Field(default=None, gt=0)
    """Cap on the model bytes with open sessions per process; least recently used sessions close first."""
    inference_timeout_seconds: float | None = Field(default=60.0, gt=0)
    """A prediction still computing after this long is stopped and answered 503 (None: no limit)."""
    memory_limit_bytes: int | None = Field(default=None, gt=0)
    """Address-space cap of each server process: an inference that would need more is refused (503), not killed."""
    max_queue: int = Field(default=256, gt=0)
    """Predictions waiting or running per model variant and process; beyond it requests get 429 at once."""
    max_context_tokens: int = Field(default=131_072, ge=16)
    """Longest context a generation model may claim at upload; a longer one is refused (422)."""
    max_generations: int = Field(default=8, gt=0)
    """Text generations running at once per model and process; beyond it requests get 429 with Retry-After."""
    generation_threads: int = Field(default=0, ge=0)
    """onnxruntime intra-op threads of each generation model (0: all cores); generations running at once share
    them, without spinning."""
    inline_inference_max_ms: float = Field(default=0.2, ge=0)
    """Models whose typical inference is faster than this run on the event loop: a thread hop costs more."""
    execution_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["CPUExecutionProvider"]
    )
    """onnxruntime execution providers in order of preference (comma-separated)."""
    catalog_ttl_seconds: float = Field(default=1.0, ge=0)
    """How long a process trusts its cached copy of a model's metadata and routing."""
    preload_models: dict[str, PreloadModel] = Field(default_factory=dict)
    """JSON `{name: {"file": path, "samples": path}}` of models registered at start-up if missing."""
    log_level: str = "info"
    """Log level of the server and the application loggers."""
    queue: Literal["embedded", "celery"] = "embedded"
    """Where compression jobs run: a child process of the server, or Celery workers (`slimserve worker`)."""
    broker_url: str | None = None
    """Celery broker for `queue=celery`, e.g. redis://127.0.0.1:6379/0."""
    celery_queue: str = "slimserve-jobs"
    """Celery queue name (one per deployment sharing a broker)."""
    celery_visibility_timeout: int = Field(default=3600, ge=10)
    """Seconds before Redis re-delivers a job whose worker vanished without a word."""
    embedded_workers: int = Field(default=1, ge=0, le=64)
    """Compression jobs run at once by one server in embedded mode (0: this replica runs none; others sharing
    its database do)."""
    worker_nice: int = Field(default=10, ge=0, le=19)
    """CPU niceness added to compression processes, so predictions keep their latency."""
    job_max_attempts: int = Field(default=3, ge=1, le=20)
    """Times a job is started before it is failed for good (a worker lost mid-job counts)."""
    job_heartbeat_seconds: float = Field(default=2.0, gt=0)
    """How often a running job writes its progress and heartbeat."""
    job_stale_seconds: float = Field(default=30.0, gt=0)
    """A running job silent for this long is taken to be lost and is run again."""
    capture_flush_seconds: float = Field(default=30.0, gt=0)
    """How often captured prediction inputs are merged into each model's `traffic` dataset."""
    compression_threads: int = Field(default=1, ge=1)
    """onnxruntime/torch threads of one compression job (measurements use the same for both sides)."""

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_api_keys(value)
        return value

    @field_validator("execution_providers", mode="before")
    @classmethod
    def _parse_providers(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @model_validator(mode="after")
    def _refuse_open_network_without_keys(self) -> Settings:
        if not self.api_keys and not self.allow_insecure and not is_loopback(self.host):
            raise ValueError(
                f"refusing to listen on {self.host} without API keys: set SLIMSERVE_API_KEYS, "
                "or SLIMSERVE_ALLOW_INSECURE=1 to accept unauthenticated access"
            )
        return self

    @model_validator(mode="after")
    def _celery_needs_a_broker(self) -> Settings:
        if self.queue == "celery" and not self.broker_url:
            raise ValueError("SLIMSERVE_QUEUE=celery needs SLIMSERVE_BROKER_URL (e.g. redis://127.0.0.1:6379/0)")
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'slimserve.db').resolve()}"

    def worker_env(self) -> dict[str, str]:
        """What a job process needs to see the same database and files as this server."""
        return {
            "SLIMSERVE_DATA_DIR": str(self.data_dir.resolve()),
            "SLIMSERVE_DATABASE_URL": self.resolved_database_url,
            "SLIMSERVE_JOB_MAX_ATTEMPTS": str(self.job_max_attempts),
            "SLIMSERVE_JOB_HEARTBEAT_SECONDS": str(self.job_heartbeat_seconds),
            "SLIMSERVE_JOB_STALE_SECONDS": str(self.job_stale_seconds),
            "SLIMSERVE_COMPRESSION_THREADS": str(self.compression_threads),
            "SLIMSERVE_LOG_LEVEL": self.log_level,
            "SLIMSERVE_QUEUE": "embedded",
            **({"SLIMSERVE_STORAGE_URL": self.storage_url,
                "SLIMSERVE_STORAGE_OPTIONS": json.dumps(self.storage_options)} if self.storage_url else {}),
        }

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)


def parse_api_keys(raw: str) -> list[ApiKey]:
    import hashlib

    keys: list[ApiKey] = []
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            continue
        role, sep, secret = entry.partition(":")
        if not sep:
            role, secret = "admin", entry
        if role not in ("admin", "predict"):
            raise ValueError(f"API key role must be 'admin' or 'predict', got {role!r}")
        if len(secret) < 8:
            raise ValueError("each API key must be at least 8 characters long")
        # The id is a digest prefix so logs can say who acted without revealing the key.
        key_id = hashlib.sha256(secret.encode()).hexdigest()[:12]
        keys.append(ApiKey(key_id=key_id, role=role, secret=secret))
    return keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
