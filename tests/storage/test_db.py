from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import inspect

from app.main import create_app
from app.storage.db import make_engine, migrate
from tests.conftest import upload
from tests.helpers import MLP


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrations_create_the_schema_on_sqlite_and_are_idempotent(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'meta.db'}"
    engine = make_engine(url)
    migrate(engine)
    migrate(engine)
    engine.dispose()
    assert {"models", "variants", "datasets", "jobs", "alembic_version"} <= _tables(url)


def test_migrations_and_uploads_on_postgresql(postgres_url: str, make_settings) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(database_url=postgres_url)
    with TestClient(create_app(settings)) as client:
        assert upload(client, "mlp", MLP).status_code == 201
        assert upload(client, "mlp", MLP).status_code == 409
        assert client.post("/models/mlp/predict", json={"inputs": [[0.0] * 64]}).status_code == 200
    assert {"models", "variants", "datasets", "jobs"} <= _tables(postgres_url)
    # A second app on the same database sees the model: metadata lives in PostgreSQL.
    with TestClient(create_app(make_settings(database_url=postgres_url))) as client:
        assert client.get("/models/mlp").json()["name"] == "mlp"
