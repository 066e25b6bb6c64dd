from __future__ import annotations

import time
from typing import Any, Protocol


class _Client(Protocol):
    def get(self, url: str) -> Any: ...


def wait_for_job(client: _Client, job_id: str, timeout: float = 120.0,
                 states: tuple[str, ...] = ("succeeded", "failed", "cancelled")) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s: {job}")


def wait_for_state(client: _Client, job_id: str, state: str, timeout: float = 60.0) -> dict[str, Any]:
    return wait_for_job(client, job_id, timeout, states=(state,))
