"""`slimserve` client commands: talk to a running server (upload, compress with progress, routing, bench...)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.client import ServerError, SlimServeClient

console = Console()
Url = Annotated[str, typer.Option("--url", envvar="SLIMSERVE_URL", help="Server address")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="SLIMSERVE_API_KEY", help="API key")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _client(url: str, api_key: str | None) -> SlimServeClient:
    return SlimServeClient(url, api_key)


def _fail(exc: ServerError) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(1)


def _ask(url: str, api_key: str | None, call: Callable[[SlimServeClient], Any]) -> Any:
    """One call to the server; its refusal is printed and ends the command with exit code 1."""
    try:
        with _client(url, api_key) as client:
            return call(client)
    except ServerError as exc:
        raise _fail(exc) from None


def upload(file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
           name: Annotated[str, typer.Option("--name", help="Model name")],
           samples: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help=".npz samples")] = None,
           compress: Annotated[str | None, typer.Option(help="Preset or JSON recipe to start at once")] = None,
           input_shapes: Annotated[str | None, typer.Option(
               help='PyTorch files without samples: JSON {input: [dims]}, e.g. \'{"x": ["batch", 1, 8, 8]}\'')] = None,
           url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Upload a model (and samples); a PyTorch file is followed through its conversion. Print inputs and outputs."""
    try:
        with _client(url, api_key) as client:
            model = client.upload(file, name, samples, compress, input_shapes)
            if model["state"] == "converting":
                console.print(f"uploaded {model['format']} file; converting to ONNX")
                conversion = next(j for j in client.jobs(name) if j["recipe"] == "convert")
                _follow(client, conversion["id"])
                model = client.model(name)
    except ServerError as exc:
        raise _fail(exc) from None
    if model["state"] != "ready":
        console.print(f"[red]conversion failed:[/red] {model['error'] or model['state']}")
        raise typer.Exit(1)
    console.print(f"uploaded [bold]{model['name']}[/bold]: {model['size_bytes']:,} bytes, {model['parameters']:,} "
                  f"parameters, opset {model['opset']}, sha256 {model['sha256'][:12]}")
    if model.get("conversion"):
        conversion = model["conversion"]
        console.print(f"  converted from {model['format']}: max abs error vs PyTorch {conversion['max_abs_error']:.2g}"
                      f" over {conversion['rows_checked']} rows")
    for kind in ("inputs", "outputs"):
        for tensor in model[kind]:
            console.print(f"  {kind[:-1]} {tensor['name']}: {tensor['datatype']} {tensor['shape']}")
    for warning in model["warnings"]:
        console.print(f"  [yellow]warning:[/yellow] {warning}")


def compress(name: Annotated[str, typer.Argument(help="Model")],
             recipe: Annotated[str, typer.Argument(help="Preset name, or a recipe as JSON")],
             dataset: Annotated[str | None, typer.Option(help="Dataset id or name")] = None,
             budget: Annotated[str | None, typer.Option(help="metric:max_drop, e.g. agreement:0.01")] = None,
             variant: Annotated[str | None, typer.Option(help="Name of the result")] = None,
             promote: Annotated[bool, typer.Option(help="Make it the default if within budget")] = False,
             objective: Annotated[str | None, typer.Option(help="auto only: size, latency or balanced")] = None,
             wait: Annotated[bool, typer.Option(help="Follow the job until it ends")] = True,
             url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Start a compression job and follow it with a progress bar."""
    body: dict[str, Any] = {"recipe": json.loads(recipe) if recipe.lstrip().startswith("{") else recipe,
                            "promote": promote}
    if dataset:
        body["dataset"] = dataset
    if variant:
        body["variant"] = variant
    if objective:
        body["objective"] = objective
    if budget:
        metric, _, drop = budget.partition(":")
        try:
            body["budget"] = {"metric": metric, "max_drop": float(drop or 0.01)}
        except ValueError:
            raise typer.BadParameter("--budget is metric:max_drop, e.g. agreement:0.01") from None
    try:
        with _client(url, api_key) as client:
            job = client.compress(name, body)
            console.print(f"job {job['id']} queued: {name} -> {job['variant']}")
            if not wait:
                return
            job = _follow(client, job["id"])
    except ServerError as exc:
        raise _fail(exc) from None
    if job["state"] != "succeeded":
        console.print(f"[red]job {job['state']}:[/red] {job['error'] or ''}")
        raise typer.Exit(1)
    report = job["report"]
    console.print(f"[green]done[/green]: variant [bold]{job['variant']}[/bold], size {report['size_ratio']:.3f}×, "
                  f"speedup {_speed(report)}, {_fidelity(report)}, "
                  f"{'within' if report['within_budget'] else 'over'} budget")


def _follow(client: SlimServeClient, job_id: str) -> Any:
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("queued", total=1.0)
        while True:
            job = client.job(job_id)
            progress.update(task, completed=job["progress"], description=(job["stage"] or job["state"])[:60])
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.5)


def jobs(model: Annotated[str | None, typer.Option(help="Only this model's jobs")] = None,
         url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List jobs, newest first."""
    rows = _ask(url, api_key, lambda client: client.jobs(model))
    table = Table("id", "model", "recipe", "state", "progress", "variant", "error")
    for job in rows:
        recipe = job["recipe"] if isinstance(job["recipe"], str) else "custom"
        table.add_row(job["id"][:8], job["model"], recipe, job["state"], f"{job['progress']:.0%}",
                      job["variant"] or "", (job["error"] or "")[:60])
    console.print(table)


def models(url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List models with their variants and default."""
    rows = _ask(url, api_key, lambda client: client.models())
    table = Table("name", "state", "size", "parameters", "variants", "default")
    for model in rows:
        table.add_row(model["name"], model["state"], f"{model['size_bytes']:,}", f"{model['parameters'] or 0:,}",
                      ", ".join(v["name"] for v in model["variants"]), model["routing"]["default"])
    console.print(table)


def variants(name: Annotated[str, typer.Argument(help="Model")], url: Url = DEFAULT_URL,
             api_key: ApiKey = None) -> None:
    """A model's variants side by side with the original: size, speedup, fidelity."""
    model = _ask(url, api_key, lambda client: client.model(name))
    table = Table("variant", "size", "size ×", "speedup b1", "speedup bN", "fidelity", "budget")
    for variant in model["variants"]:
        report = variant["report"]
        if report is None:
            table.add_row(variant["name"], f"{variant['size_bytes']:,}", "1.000", "1.00", "1.00", "reference", "")
            continue
        batch_n = report["speedup"]["batch_n"]
        table.add_row(variant["name"], f"{variant['size_bytes']:,}", f"{report['size_ratio']:.3f}",
                      f"{report['speedup']['batch_1']:.2f}", "-" if batch_n is None else f"{batch_n:.2f}",
                      _fidelity(report), "within" if report["within_budget"] else "over")
    console.print(table)


def predict(name: Annotated[str, typer.Argument(help="Model")],
            input_file: Annotated[Path | None, typer.Option("--input", exists=True, dir_okay=False,
                                                            help=".npz (one array per input) or .json")] = None,
            text: Annotated[list[str] | None, typer.Option("--text", help="A text for a text model (repeat for a "
                                                                           "batch)")] = None,
            variant: Annotated[str | None, typer.Option(help="Variant (default: routing decides)")] = None,
            url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Run one prediction and print the outputs as JSON."""
    if (input_file is None) == (not text):
        raise typer.BadParameter("give either --input FILE or --text (one or more)")
    inputs = _read_inputs(input_file) if input_file is not None else {"text": text}
    answer = _ask(url, api_key, lambda client: client.predict(name, inputs, variant))
    console.print_json(json.dumps(answer))


def _read_inputs(path: Path) -> dict[str, Any]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key].tolist() for key in archive.files if key != "labels"}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{path} is not JSON: {exc}") from None
    if isinstance(data, dict) and "inputs" in data:
        data = data["inputs"]
    if not isinstance(data, dict):
        raise typer.BadParameter("the JSON must map input names to nested lists")
    return data


def route(name: Annotated[str, typer.Argument(help="Model")],
          default: Annotated[str | None, typer.Option(help="Default variant")] = None,
          canary: Annotated[str | None, typer.Option(help="VARIANT:PERCENT, or 'off'")] = None,
          shadow: Annotated[str | None, typer.Option(help="VARIANT:PERCENT, or 'off'")] = None,
          url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Change a model's routing: default variant, canary split, shadow traffic."""
    try:
        with _client(url, api_key) as client:
            current = client.model(name)["routing"]
            routing = {"default": default or current["default"],
                       "canary": _split(canary, current["canary"]), "shadow": _split(shadow, current["shadow"])}
            result = client.route(name, routing)
    except ServerError as exc:
        raise _fail(exc) from None
    console.print(f"routing of {name}: {json.dumps(result)}")


def _split(option: str | None, current: Any) -> Any:
    if option is None:
        return current
    if option == "off":
        return None
    variant, sep, percent = option.rpartition(":")
    if not sep or not variant:
        raise typer.BadParameter(f"expected VARIANT:PERCENT, got {option!r}")
    try:
        return {"variant": variant, "percent": float(percent)}
    except ValueError:
        raise typer.BadParameter(f"percent must be a number, got {percent!r}") from None


def bench(name: Annotated[str, typer.Argument(help="Model")],
          variant_list: Annotated[str | None, typer.Option("--variants", help="Comma-separated; default all")] = None,
          concurrency: Annotated[int, typer.Option(min=1, max=256)] = 16,
          requests: Annotated[int, typer.Option(min=1, max=100_000)] = 500,
          input_file: Annotated[Path | None, typer.Option("--input", exists=True, dir_okay=False)] = None,
          url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Client-side latency per variant (includes this client's own cost; for server numbers see /metrics)."""
    model = _ask(url, api_key, lambda client: client.model(name))
    names = variant_list.split(",") if variant_list else [v["name"] for v in model["variants"]]
    inputs = _read_inputs(input_file) if input_file else _generated_inputs(model)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    table = Table("variant", "requests", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms")
    failed = 0
    for variant in names:
        latencies, errors, seconds = asyncio.run(_load(url, name, variant, inputs, concurrency, requests, headers))
        failed += errors
        values = np.array(latencies) if latencies else np.array([float("nan")])
        table.add_row(variant, str(len(latencies) + errors), str(errors), f"{len(latencies) / seconds:,.0f}",
                      *(f"{np.percentile(values, q):.2f}" for q in (50, 90, 99)))
    console.print(table)
    if failed:
        raise typer.Exit(1)


def _generated_inputs(model: dict[str, Any]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    inputs = {}
    for tensor in model["inputs"]:
        if not tensor["datatype"].startswith("FP"):
            raise typer.BadParameter(f"input {tensor['name']} is {tensor['datatype']}: pass --input with real data")
        shape = [1 if d < 0 else d for d in tensor["shape"]]
        inputs[tensor["name"]] = rng.standard_normal(shape).astype(np.float32).tolist()
    return inputs


async def _load(url: str, model: str, variant: str, inputs: dict[str, Any], concurrency: int, total: int,
                headers: dict[str, str]) -> tuple[list[float], int, float]:
    body = {"inputs": inputs, "variant": variant}
    latencies: list[float] = []
    errors = 0
    remaining = total

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors, remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            response = await client.post(f"/models/{model}/predict", json=body)
            if response.status_code == 200:
                latencies.append((time.perf_counter() - started) * 1e3)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return latencies, errors, time.perf_counter() - started


def _speed(report: dict[str, Any]) -> str:
    speedup = report["speedup"]
    return f"{speedup['batch_1']:.2f}× (b1)" + (f", {speedup['batch_n']:.2f}× (bN)" if speedup["batch_n"] else "")


def _fidelity(report: dict[str, Any]) -> str:
    fidelity = report["fidelity"]
    if fidelity.get("accuracy") is not None:
        return f"accuracy {fidelity['accuracy']:.4f} (original {fidelity['original_accuracy']:.4f})"
    if fidelity.get("agreement") is not None:
        return f"agreement {fidelity['agreement']:.4f}"
    if fidelity.get("perplexity") is not None:
        return (f"perplexity {fidelity['perplexity']:.3f} (original {fidelity['original_perplexity']:.3f}), "
                f"token agreement {fidelity['token_agreement']:.4f}")
    return f"cosine {fidelity['cosine_mean']:.4f}"


def register(cli: typer.Typer) -> None:
    for command in (upload, compress, jobs, models, variants, predict, route, bench):
        cli.command()(command)
