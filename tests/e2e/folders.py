"""Model folders through the real server: uploaded as users zip them, then waited on until converted."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from tests.exports import zip_folder


def upload_folder(url: str, name: str, folder: Path, **fields: str) -> httpx.Response:
    return httpx.post(f"{url}/models", data={"name": name, **fields},
                      files={"file": (f"{folder.name}.zip", zip_folder(folder, folder.name))}, timeout=60)


def settled(url: str, name: str, timeout: float = 180.0) -> dict[str, Any]:
    """The model once its conversion job has ended (ready or failed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        model: dict[str, Any] = httpx.get(f"{url}/models/{name}", timeout=10).json()
        if model["state"] != "converting":
            return model
        time.sleep(0.3)
    raise AssertionError(f"{name} still converting after {timeout} s")
