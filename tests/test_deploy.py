"""Dockerfile, docker-compose.yml and the Prometheus config, read against the code (Docker does not run here)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import yaml
from typer.testing import CliRunner

from app.cli import cli
from app.main import create_app
from app.settings import Settings
from tests.helpers import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
PROMETHEUS = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    joined = DOCKERFILE.replace("\\\n", " ")
    for line in joined.splitlines():
        if line.startswith("ENV "):
            for token in shlex.split(line[4:]):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def _routes() -> set[str]:
    return set(create_app().openapi()["paths"])


def test_every_slimserve_variable_is_a_real_setting() -> None:
    fields = {f"SLIMSERVE_{name.upper()}" for name in Settings.model_fields}
    used = set(_dockerfile_env())
    for service in COMPOSE["services"].values():
        used |= set(service.get("environment", {}))
    assert "SLIMSERVE_QUEUE" in used
    unknown = {v for v in used if v.startswith("SLIMSERVE_")} - fields
    assert unknown == set()


def test_image_preload_points_at_bundled_models() -> None:
    preload = json.loads(_dockerfile_env()["SLIMSERVE_PRELOAD_MODELS"])
    assert "COPY models /opt/slimserve/models" in DOCKERFILE
    for entry in preload.values():
        for path in entry.values():
            local = REPO / Path(path).relative_to("/opt/slimserve")
            assert local.is_file(), local


def test_healthchecks_probe_a_real_route() -> None:
    paths = set(re.findall(r"http://127\.0\.0\.1:8000(/[\w/]+)", DOCKERFILE))
    paths |= set(re.findall(r"http://127\.0\.0\.1:8000(/[\w/]+)", json.dumps(COMPOSE)))
    assert paths == {"/v2/health/ready"}
    assert paths <= _routes()


def test_image_command_runs_the_cli_as_non_root() -> None:
    cmd = re.search(r'^CMD \["slimserve", "(\w+)"\]', DOCKERFILE, re.M)
    assert cmd is not None
    assert CliRunner().invoke(cli, [cmd.group(1), "--help"]).exit_code == 0
    assert re.search(r"^USER slimserve$", DOCKERFILE, re.M)
    assert '"torch==2.13.0"' in DOCKERFILE and '"torch==2.13.0"' in (REPO / "pyproject.toml").read_text()
    for source in re.findall(r"^COPY (?!--from)(\S+)", DOCKERFILE, re.M):
        assert (REPO / source).exists(), source


def test_prometheus_scrapes_every_api_replica() -> None:
    services = COMPOSE["services"]
    assert {"api", "worker", "postgres", "redis", "prometheus"} <= set(services)
    job = PROMETHEUS["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and "/metrics" in _routes()
    assert job["dns_sd_configs"][0]["names"] == ["api"] and job["dns_sd_configs"][0]["port"] == 8000
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    assert services["prometheus"]["depends_on"]["api"]["condition"] == "service_healthy"


def test_scaled_out_deployment_shares_database_broker_and_artifacts() -> None:
    services = COMPOSE["services"]
    api, worker = services["api"], services["worker"]
    assert api["deploy"]["replicas"] == 2 and worker["deploy"]["replicas"] == 2
    for service in (api, worker):
        env = service["environment"]
        assert env["SLIMSERVE_QUEUE"] == "celery" and env["SLIMSERVE_BROKER_URL"].startswith("redis://redis:")
        assert env["SLIMSERVE_DATABASE_URL"].startswith("postgresql+psycopg://") and "@postgres:5432/" in \
            env["SLIMSERVE_DATABASE_URL"]
        assert service["volumes"] == ["artifacts:/data"] and env["SLIMSERVE_DATA_DIR"] == "/data"
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["command"] == ["slimserve", "worker"]
    assert CliRunner().invoke(cli, ["worker", "--help"]).exit_code == 0


def test_every_file_the_image_copies_is_in_the_repository() -> None:
    sources = [token for line in DOCKERFILE.splitlines() if line.startswith("COPY ") and "--from=" not in line
               for token in line.split()[1:-1]]
    assert "constraints.txt" in sources
    missing = [source for source in sources if not (REPO / source).exists()]
    assert missing == []


def test_every_dependency_has_a_tested_version() -> None:
    """`make install` and the image install with constraints.txt: a dependency missing there floats."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(d for group in project["optional-dependencies"].values() for d in group)]
    names = {re.split(r"[\[<>=~!; ]", requirement, maxsplit=1)[0].lower().replace("_", "-") for requirement in wanted}
    constraints = (REPO / "constraints.txt").read_text().splitlines()
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in constraints if "==" in line}
    assert names - pinned == {"torch"}  # torch: pinned in pyproject.toml itself, installed first from its CPU wheel


def test_every_api_replica_exposes_grpc() -> None:
    container_port = Settings.model_fields["grpc_port"].default
    assert re.search(rf"^EXPOSE 8000 {container_port}$", DOCKERFILE, re.M)
    ports = COMPOSE["services"]["api"]["ports"]
    replicas = COMPOSE["services"]["api"]["deploy"]["replicas"]
    for published in ports:
        host_range, _, target = published.rpartition(":")
        first, _, last = host_range.split(":")[-1].partition("-")
        assert int(last) - int(first) + 1 == replicas  # one host port per replica
    assert {p.rpartition(":")[2] for p in ports} == {"8000", str(container_port)}
