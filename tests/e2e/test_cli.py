"""Every `slimserve` client command against a real server, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.helpers import MLP, MLP_SAMPLES, REPO
from tests.processes import Server, free_port

pytestmark = pytest.mark.e2e


def _cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args, "--url", url], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_client_commands(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    url = server_factory(tmp_path / "cli").url
    uploaded = _cli("upload", str(MLP), "--name", "mlp", "--samples", str(MLP_SAMPLES), url=url)
    assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
    assert "uploaded mlp" in uploaded.stdout and "input input: FP32 [-1, 64]" in uploaded.stdout
    again = _cli("upload", str(MLP), "--name", "mlp", url=url)
    assert again.returncode == 1 and "already exists" in again.stdout

    compressed = _cli("compress", "mlp", "int8-dynamic", "--budget", "agreement:0.05", url=url)
    assert compressed.returncode == 0, compressed.stdout + compressed.stderr
    assert "done: variant int8-dynamic" in compressed.stdout and "within budget" in compressed.stdout
    # half the weights zeroed moves the outputs: a zero cosine budget cannot be met, so nothing is promoted
    refused = _cli("compress", "mlp", "prune-50", "--budget", "cosine:0", "--promote", url=url)
    assert refused.returncode == 1 and "job failed" in refused.stdout and "misses the budget" in refused.stdout
    bad_budget = _cli("compress", "mlp", "int8-static", "--budget", "agreement:lots", url=url)
    assert bad_budget.returncode == 2

    jobs = _cli("jobs", "--model", "mlp", url=url)
    assert jobs.returncode == 0 and "succeeded" in jobs.stdout
    models = _cli("models", url=url)
    assert models.returncode == 0 and "mlp" in models.stdout and "int8-dynamic" in models.stdout
    variants = _cli("variants", "mlp", url=url)
    assert variants.returncode == 0 and "reference" in variants.stdout and "within" in variants.stdout

    request = tmp_path / "request.json"
    request.write_text(json.dumps({"inputs": {"input": [[0.0] * 64]}}))
    predicted = _cli("predict", "mlp", "--input", str(request), "--variant", "int8-dynamic", url=url)
    assert predicted.returncode == 0 and json.loads(predicted.stdout)["variant"] == "int8-dynamic"
    from_npz = _cli("predict", "mlp", "--input", str(MLP_SAMPLES), url=url)
    assert from_npz.returncode == 0 and len(json.loads(from_npz.stdout)["outputs"]["logits"]) == 450

    routed = _cli("route", "mlp", "--canary", "int8-dynamic:10", "--shadow", "int8-dynamic:5", url=url)
    assert routed.returncode == 0 and '"percent": 10.0' in routed.stdout
    assert _cli("route", "mlp", "--canary", "off", "--shadow", "off", url=url).returncode == 0
    assert _cli("route", "mlp", "--canary", "nonsense", url=url).returncode == 2
    assert _cli("route", "mlp", "--default", "ghost", url=url).returncode == 1

    benched = _cli("bench", "mlp", "--requests", "40", "--concurrency", "4", url=url)
    assert benched.returncode == 0, benched.stdout + benched.stderr
    assert "original" in benched.stdout and "int8-dynamic" in benched.stdout

    unreachable = _cli("models", url=f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stdout


def test_client_options_against_a_protected_server(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    key = "cli-admin-key-0123"
    url = server_factory(tmp_path / "keys", SLIMSERVE_API_KEYS=f"admin:{key}").url

    def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", **env})

    refused = cli("models", "--url", url)
    assert refused.returncode == 1 and "API key is required" in refused.stdout
    uploaded = cli("upload", str(MLP), "--name", "mlp", "--samples", str(MLP_SAMPLES), "--url", url,
                   "--api-key", key)
    assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
    # The address and the key from the environment, the dataset named, the result promoted.
    env = {"SLIMSERVE_URL": url, "SLIMSERVE_API_KEY": key}
    compressed = cli("compress", "mlp", "int8-dynamic", "--dataset", "samples", "--promote",
                     "--budget", "agreement:0.05", **env)
    assert compressed.returncode == 0, compressed.stdout + compressed.stderr
    assert cli("models", **env).returncode == 0
    model = httpx.get(f"{url}/models/mlp", headers={"X-API-Key": key}).json()
    assert model["routing"]["default"] == "int8-dynamic"
    job = httpx.get(f"{url}/jobs", headers={"X-API-Key": key}).json()["jobs"][0]
    assert job["dataset"] == model["datasets"][0]["id"] and job["promote"] is True
    unknown_dataset = cli("compress", "mlp", "fp16", "--dataset", "nope", **env)
    assert unknown_dataset.returncode == 1 and "no dataset 'nope'" in unknown_dataset.stdout
    benched = cli("bench", "mlp", "--variants", "original", "--requests", "20", "--concurrency", "2", **env)
    assert benched.returncode == 0, benched.stdout + benched.stderr
    assert "original" in benched.stdout and "int8-dynamic" not in benched.stdout
