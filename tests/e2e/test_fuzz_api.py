"""Schema fuzzing: schemathesis generates requests for every operation of our own OpenAPI schema against a real
server; none may get a 500, and every error must be the JSON shape of the contract."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.processes import start_server

pytestmark = pytest.mark.e2e


def test_every_operation_survives_generated_requests(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data")
    try:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]  # Err fails
        assert len(operations) >= 20
        failures: list[str] = []
        calls: list[int] = []
        for operation in operations:

            @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=operation.as_strategy())
            def check(case: schemathesis.Case[Any]) -> None:
                response = case.call(base_url=server.url, timeout=30)
                calls.append(response.status_code)
                where = f"{case.method} {case.formatted_path} -> {response.status_code}"
                if response.status_code >= 500:
                    failures.append(f"{where}: {response.text[:200]}")
                elif response.status_code >= 400:
                    try:
                        error = response.json().get("error")
                    except ValueError:
                        error = None
                    if not isinstance(error, str) or not error:
                        failures.append(f"{where}: error body without 'error': {response.text[:200]}")

            check()
        assert failures == []
        assert len(calls) >= 5 * len(operations)  # the generator really exercised every operation
        assert server.process.poll() is None  # still serving
    finally:
        server.stop()
