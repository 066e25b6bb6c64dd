from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.main import create_app
from app.settings import Settings
from tests.conftest import upload
from tests.helpers import MLP

ADMIN = "admin-key-0123"
READER = "reader-key-4567"


@pytest.fixture
def secured(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    settings = make_settings(api_keys=f"admin:{ADMIN},predict:{READER}", public_metrics=False)
    with TestClient(create_app(settings)) as client:
        yield client


def test_admin_keys_manage_and_predict_keys_only_predict(secured: TestClient) -> None:
    assert upload(secured, "mlp", MLP).status_code == 401
    assert upload(secured, "mlp", MLP, Authorization=f"Bearer {READER}").status_code == 403
    assert upload(secured, "mlp", MLP, Authorization=f"Bearer {ADMIN}").status_code == 201
    body = {"inputs": [[0.0] * 64]}
    assert secured.post("/models/mlp/predict", json=body).status_code == 401
    assert secured.post("/models/mlp/predict", json=body, headers={"X-API-Key": "wrong-key-000"}).status_code == 401
    assert secured.post("/models/mlp/predict", json=body, headers={"X-API-Key": READER}).status_code == 200
    assert secured.get("/models", headers={"X-API-Key": READER}).status_code == 200
    assert secured.delete("/models/mlp", headers={"X-API-Key": READER}).status_code == 403
    assert secured.get("/metrics").status_code == 401
    assert secured.get("/metrics", headers={"X-API-Key": READER}).status_code == 200
    # Health stays open for orchestrators.
    assert secured.get("/v2/health/ready").status_code == 200
    assert secured.delete("/models/mlp", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 204


def test_refuses_open_network_without_keys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationError, match="without API keys"):
        Settings(host="0.0.0.0", data_dir=tmp_path)
    assert Settings(host="0.0.0.0", data_dir=tmp_path, allow_insecure=True).host == "0.0.0.0"
    assert Settings(host="0.0.0.0", data_dir=tmp_path, api_keys="longenoughkey").api_keys[0].role == "admin"
    assert Settings(host="::1", data_dir=tmp_path).host == "::1"


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SLIMSERVE_PORT", "9123")
    monkeypatch.setenv("SLIMSERVE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SLIMSERVE_API_KEYS", "predict:abcdefgh12,admin:zyxwvuts98")
    monkeypatch.setenv("SLIMSERVE_MAX_UPLOAD_BYTES", "1000")
    settings = Settings()
    assert settings.port == 9123 and settings.data_dir == tmp_path and settings.max_upload_bytes == 1000
    assert [k.role for k in settings.api_keys] == ["predict", "admin"]
    assert all(len(k.key_id) == 12 and k.key_id not in k.secret for k in settings.api_keys)
    monkeypatch.setenv("SLIMSERVE_API_KEYS", "root:abcdefgh12")
    with pytest.raises(ValidationError, match="role"):
        Settings()


def test_management_actions_are_audited_without_the_key(secured: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    import json as json_module
    import logging

    with caplog.at_level(logging.INFO, logger="slimserve.audit"):
        assert upload(secured, "mlp", MLP, Authorization=f"Bearer {ADMIN}").status_code == 201
        assert secured.delete("/models/mlp", headers={"X-API-Key": ADMIN}).status_code == 204
    events = [json_module.loads(r.getMessage()) for r in caplog.records if r.name == "slimserve.audit"]
    assert [(e["method"], e["path"]) for e in events] == [("POST", "/models"), ("DELETE", "/models/mlp")]
    assert all(e["key_id"] and len(e["key_id"]) == 12 and e["time"] for e in events)
    assert all(ADMIN not in r.getMessage() for r in caplog.records)


def test_health_can_be_protected(make_settings) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(api_keys=f"predict:{READER}", public_health=False)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v2/health/ready").status_code == 401
        assert client.get("/v2/health/live").status_code == 401
        assert client.get("/v2/health/ready", headers={"X-API-Key": READER}).json() == {"ready": True}
