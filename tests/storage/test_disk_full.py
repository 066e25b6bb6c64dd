"""A full disk (injected ENOSPC): uploads answer 507, what is stored stays intact, predictions go on."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from app.storage import artifacts
from tests.conftest import upload
from tests.helpers import CNN


class _FullDisk:
    """A file object whose writes fail the way a full file system fails them."""

    def __init__(self, real: object) -> None:
        self._real = real

    def write(self, _data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


def test_full_disk_refuses_uploads_and_keeps_serving(
    mlp_client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    stored = {p: p.read_bytes() for p in (settings.data_dir / "artifacts").rglob("*") if p.is_file()}
    original_init = artifacts.TempWriter.__init__

    def full_disk_init(self: artifacts.TempWriter, path: Path, max_bytes: int, what: str) -> None:
        original_init(self, path, max_bytes, what)
        self._file = _FullDisk(self._file)  # type: ignore[assignment]

    monkeypatch.setattr(artifacts.TempWriter, "__init__", full_disk_init)
    response = upload(mlp_client, "cnn", CNN)
    assert response.status_code == 507 and "storage is full" in response.json()["error"]
    assert mlp_client.get("/models/cnn").status_code == 404
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in (settings.data_dir / "artifacts").rglob("*") if p.is_file()} == stored
    assert list((settings.data_dir / "tmp").glob("*.part")) == []
    assert mlp_client.post("/models/mlp/predict", json={"inputs": [[0.0] * 64]}).status_code == 200
    assert upload(mlp_client, "cnn", CNN).status_code == 201  # space is back: uploads work again
