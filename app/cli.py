"""`slimserve` command line: run the server."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from app.settings import Settings

cli = typer.Typer(help="SlimServe: compress models, measure them, serve them.", no_args_is_help=True)


@cli.callback()
def _root() -> None:
    """SlimServe command line."""


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (SLIMSERVE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (SLIMSERVE_PORT)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory (SLIMSERVE_DATA_DIR)")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Server processes")] = 1,
) -> None:
    """Start the HTTP server (Open Inference Protocol, management API, /metrics)."""
    # Worker processes build their own Settings from the environment, so flags travel through it.
    for key, value in (("SLIMSERVE_HOST", host), ("SLIMSERVE_PORT", port), ("SLIMSERVE_DATA_DIR", data_dir)):
        if value is not None:
            os.environ[key] = str(value)
    try:
        settings = Settings()
    except ValidationError as exc:
        typer.echo(f"invalid configuration: {exc}", err=True)
        raise typer.Exit(2) from None
    import uvicorn

    uvicorn.run(
        "app.main:create_app", factory=True, host=settings.host, port=settings.port, workers=workers,
        loop="uvloop", http="httptools", access_log=False, log_level=settings.log_level,
        timeout_graceful_shutdown=10,
    )


def main() -> None:
    sys.exit(cli())
