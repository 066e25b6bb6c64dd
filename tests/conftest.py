from __future__ import annotations

import faulthandler
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from app.main import create_app
from app.settings import Settings
from tests.fault_report import FAULT_DIR
from tests.helpers import MLP, MLP_SAMPLES

if TYPE_CHECKING:
    from tests.torch_files import TorchProcess

_fault_log: list[TextIO] = []


def pytest_configure(config: pytest.Config) -> None:
    # Should pytest itself die in native code, the dump goes to a file, after the name of the test it ran,
    # and `make test` prints the part that matters last (pytest's own handler buries it under every thread).
    FAULT_DIR.mkdir(parents=True, exist_ok=True)
    handle = open(FAULT_DIR / f"{os.getpid()}.log", "w")  # noqa: SIM115 - open for the session, see unconfigure
    _fault_log.append(handle)
    faulthandler.enable(handle, all_threads=True)


def pytest_runtest_logstart(nodeid: str) -> None:
    for handle in _fault_log:
        handle.write(f"running {nodeid}\n")
        handle.flush()


def pytest_unconfigure(config: pytest.Config) -> None:
    faulthandler.disable()
    while _fault_log:
        handle = _fault_log.pop()
        handle.close()
        Path(handle.name).unlink(missing_ok=True)


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment() -> Iterator[None]:
    """Settings come from each test, never from the shell that started pytest (or from `make`)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("SLIMSERVE_")}
    for key in saved:
        del os.environ[key]
    yield
    os.environ.update(saved)


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        # In-process apps serve no gRPC unless a test asks (a port per app, never a developer's 8001).
        values: dict[str, Any] = {"data_dir": tmp_path / "data", "grpc_port": 0}
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


POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database per test on the machine's PostgreSQL, dropped afterwards."""
    name = f"slimserve_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def broker() -> Iterator[tuple[str, str]]:
    """(broker URL, queue name): a queue of this test's own on the machine's Redis, deleted afterwards."""
    import redis

    queue = f"slimserve-test-{uuid.uuid4().hex[:12]}"
    yield f"{REDIS_URL}/0", queue
    connection = redis.Redis.from_url(f"{REDIS_URL}/0")
    for key in connection.scan_iter(f"*{queue}*"):
        connection.delete(key)
    connection.close()


@pytest.fixture(scope="session")
def torch_process() -> Iterator[TorchProcess]:
    """A child process for the tests' PyTorch work (exports, TorchScript, conversions, PyTorch's own answers)."""
    from tests.torch_files import TorchProcess

    process = TorchProcess()
    yield process
    process.close()


@pytest.fixture(scope="session")
def torch_model_files(tmp_path_factory: pytest.TempPathFactory, torch_process: TorchProcess) -> dict[str, Path]:
    """The example networks saved as users save them (.pt2, TorchScript, and pickles to refuse); built once."""
    from tests import torch_files

    return torch_process.call(torch_files.build, tmp_path_factory.mktemp("torch"))


@pytest.fixture(scope="session")
def keras_model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Keras models saved by Keras (.keras and .h5), Keras' own answers, and a hostile Lambda file; built once."""
    from tests import keras_files

    return keras_files.build_in_child(tmp_path_factory.mktemp("keras"))
