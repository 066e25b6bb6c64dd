"""The provisioned Grafana dashboard asks only for metrics the server really exports."""

from __future__ import annotations

import json
import re
import time

import yaml
from fastapi.testclient import TestClient

from app.main import create_app
from tests.conftest import upload
from tests.helpers import MLP, MLP_SAMPLES, REPO

DASHBOARD = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "slimserve.json").read_text())
METRIC = re.compile(r"\bslimserve_[a-z_]+\b")


def _expressions() -> list[str]:
    return [target["expr"] for panel in DASHBOARD["panels"] for target in panel["targets"]]


def test_every_dashboard_expression_names_exported_metrics(make_settings) -> None:  # type: ignore[no-untyped-def]
    with TestClient(create_app(make_settings(catalog_ttl_seconds=0.0))) as client:
        assert upload(client, "mlp", MLP, MLP_SAMPLES).status_code == 201
        job = client.post("/models/mlp/compressions", json={"recipe": "int8-dynamic"}).json()
        deadline = time.monotonic() + 120
        while client.get(f"/jobs/{job['id']}").json()["state"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        client.put("/models/mlp/routing", json={"default": "original",
                                                "shadow": {"variant": "int8-dynamic", "percent": 100}})
        for _ in range(5):
            assert client.post("/models/mlp/predict", json={"inputs": [[0.0] * 64]}).status_code == 200
        assert client.post("/models/mlp/predict", json={"inputs": [[0.0] * 3]}).status_code == 400
        time.sleep(0.5)  # shadow runs finish after the answers
        text = client.get("/metrics").text
        exported = set(METRIC.findall(text))
        # Families declared but not observed yet (generation metrics on a server without an LLM) still export
        # their samples' names once observed: a histogram's _bucket, _sum and _count.
        for family in re.findall(r"^# TYPE (slimserve_[a-z_]+) histogram$", text, re.MULTILINE):
            exported |= {f"{family}_bucket", f"{family}_sum", f"{family}_count"}
    used = {name for expr in _expressions() for name in METRIC.findall(expr)}
    assert used, "the dashboard has no SlimServe queries"
    assert used - exported == set()
    for required in ("slimserve_request_duration_seconds_bucket", "slimserve_batch_size_sum",
                     "slimserve_shadow_agreement_ratio", "slimserve_compression_jobs_total"):
        assert required in used


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    datasource = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/slimserve.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert {p["datasource"]["uid"] for p in DASHBOARD["panels"]} == {datasource["datasources"][0]["uid"]}
