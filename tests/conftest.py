from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.helpers import MLP, MLP_SAMPLES


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"data_dir": tmp_path / "data"}
        values.update(overrides)
        return Settings(**values)

    return build


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def upload(client: TestClient, name: str, model: bytes | Path, samples: bytes | Path | None = None,
           filename: str = "model.onnx", **headers: str) -> Any:
    files: dict[str, Any] = {"file": (filename, model.read_bytes() if isinstance(model, Path) else model)}
    if samples is not None:
        files["samples"] = ("samples.npz", samples.read_bytes() if isinstance(samples, Path) else samples)
    return client.post("/models", data={"name": name}, files=files, headers=headers)


@pytest.fixture
def mlp_client(client: TestClient) -> TestClient:
    response = upload(client, "mlp", MLP, MLP_SAMPLES)
    assert response.status_code == 201, response.text
    return client
