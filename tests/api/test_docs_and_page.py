"""/docs documents every field; the dashboard page is self-contained."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient


def test_every_schema_field_has_a_description_or_an_example(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    bare = [f"{name}.{field}" for name, body in schema["components"]["schemas"].items()
            for field, spec in (body.get("properties") or {}).items()
            if not spec.get("description") and "examples" not in spec and "example" not in spec]
    assert bare == []
    # Errors are documented as what the server really sends.
    assert schema["components"]["schemas"]["HTTPValidationError"]["required"] == ["error", "code"]


def test_the_dashboard_page_loads_nothing_from_outside(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    addresses = set(re.findall(r"https?://[^\s\"'<>)]+", page.text))
    assert addresses <= {"http://www.w3.org/2000/svg"}  # the SVG namespace name, never fetched
    assert "<script src" not in page.text and "<link" not in page.text
