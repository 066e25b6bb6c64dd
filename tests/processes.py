"""Real server and worker processes for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    data_dir: Path
    log: Path
    grpc_port: int = 0

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)
        kill_group(self.process)  # what it left behind: uvicorn's worker processes outlive a killed parent

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)


def start_server(data_dir: Path, port: int | None = None, args: tuple[str, ...] = (), **env: str) -> Server:
    port = port or free_port()
    log = data_dir.parent / f"server-{port}-{time.monotonic_ns()}.log"
    # Every test server gets its own gRPC port: two on 8001 would be refused (or, sharing it, mixed up).
    env.setdefault("SLIMSERVE_GRPC_PORT", str(free_port()))
    environment = {**os.environ, "SLIMSERVE_DATA_DIR": str(data_dir), "SLIMSERVE_PORT": str(port),
                   "SLIMSERVE_HOST": "127.0.0.1", **env}
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", *args], cwd=REPO, env=environment, stdout=output,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = Server(process, f"http://127.0.0.1:{port}", port, data_dir, log, int(env["SLIMSERVE_GRPC_PORT"]))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/v2/health/ready", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server did not become ready:\n{log.read_text()}")


def start_worker(log: Path, **env: str) -> subprocess.Popen[bytes]:
    """`slimserve worker` (Celery) in its own process group, so a test can kill it with its pool children."""
    environment = {**os.environ, **env}
    with open(log, "ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "app", "worker"], cwd=REPO, env=environment, stdout=output,
            stderr=subprocess.STDOUT, start_new_session=True,
        )


def kill_group(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """The process started with start_new_session and everything in its group, also after the leader exited."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    process.wait(timeout=30)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def factory(data_dir: Path | None = None, args: tuple[str, ...] = (), **env: str) -> Server:
        server = start_server(data_dir or tmp_path / "data", None, args, **env)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop(signal.SIGKILL)
