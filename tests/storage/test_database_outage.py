"""PostgreSQL unavailable: management calls answer 503, loaded models keep predicting, recovery needs no restart."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from app.main import create_app
from tests.conftest import POSTGRES_ADMIN_URL, upload
from tests.helpers import MLP


def _allow_connections(database: str, allowed: bool) -> None:
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}'))
        if not allowed:
            connection.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE datname = :name AND pid <> pg_backend_pid()"), {"name": database})
    admin.dispose()


def test_database_outage(postgres_url: str, make_settings) -> None:  # type: ignore[no-untyped-def]
    database = postgres_url.rsplit("/", 1)[1]
    row = {"inputs": [[0.0] * 64]}
    with TestClient(create_app(make_settings(database_url=postgres_url, catalog_ttl_seconds=0.2))) as client:
        assert upload(client, "mlp", MLP).status_code == 201
        before = client.post("/models/mlp/predict", json=row).json()["outputs"]
        _allow_connections(database, False)
        try:
            time.sleep(0.3)  # past the catalog's TTL: the next prediction tries the database and cannot reach it
            assert client.post("/models/mlp/predict", json=row).json()["outputs"] == before
            listed = client.get("/models")
            assert listed.status_code == 503 and listed.headers["retry-after"] == "5"
            assert listed.json()["code"] == "database_unavailable"
            assert upload(client, "other", MLP).status_code == 503
            assert client.post("/models/mlp/predict", json=row).status_code == 200
        finally:
            _allow_connections(database, True)
        assert client.get("/models").status_code == 200  # back without a restart
        assert [m["name"] for m in client.get("/models").json()["models"]] == ["mlp"]
