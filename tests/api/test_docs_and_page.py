"""/docs documents every field; the dashboard page is self-contained."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from pydantic import BaseModel


def test_every_schema_field_has_a_description_and_an_example(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    bare = [f"{name}.{field}" for name, body in schema["components"]["schemas"].items()
            for field, spec in (body.get("properties") or {}).items()
            if not spec.get("description") or not spec.get("examples")]
    bare += [f"{method.upper()} {path} {parameter['name']}" for path, operations in schema["paths"].items()
             for method, operation in operations.items() for parameter in operation.get("parameters", [])
             if not parameter.get("description") or not parameter.get("examples")]
    # Request bodies the server parses itself (V2, predict, multipart uploads) are documented inline.
    bodies = [(f"{method.upper()} {path}", media["schema"]) for path, operations in schema["paths"].items()
              for method, operation in operations.items()
              for media in (operation.get("requestBody") or {}).get("content", {}).values()
              if "$ref" not in media["schema"]]
    while bodies:
        where, body = bodies.pop()
        for field, spec in (body.get("properties") or {}).items():
            # A file part cannot carry a JSON example; its description says what goes in it.
            example = "example" in spec or spec.get("format") == "binary"
            if not spec.get("description") or not example:
                bare.append(f"{where} {field}")
            inner = spec.get("items", spec)
            if inner.get("properties"):
                bodies.append((f"{where} {field}", inner))
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


def test_the_documented_examples_are_valid_bodies() -> None:
    """Each model built from its fields' first examples passes its own validation: /docs shows real shapes."""
    from app.api import jobs, schemas

    models = [value for module in (schemas, jobs) for value in vars(module).values()
              if isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == module.__name__]
    assert len(models) >= 15
    for model in models:
        first = {name: (field.examples or [])[:1] for name, field in model.model_fields.items()}
        assert all(first.values()), model.__name__
        model.model_validate({name: example[0] for name, example in first.items()})
