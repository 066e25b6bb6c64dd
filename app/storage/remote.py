"""Artifacts on storage every node sees, through fsspec (s3://bucket/prefix, gs://..., file:///shared/dir)."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import fsspec

log = logging.getLogger(__name__)


class RemoteArtifacts:
    """Objects named like the local store's files: `<prefix>/<sha[:2]>/<sha><suffix>`."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self._fs, self._root = fsspec.core.url_to_fs(url, **(options or {}))
        self._root = self._root.rstrip("/")
        self.url = url

    def key(self, sha256: str, suffix: str) -> str:
        return f"{self._root}/{sha256[:2]}/{sha256}{suffix}"

    def put(self, local: Path, key: str) -> None:
        """Upload under a temporary name, then move: readers never see a partial object."""
        size = local.stat().st_size
        if self._fs.exists(key) and self._fs.size(key) == size:
            return
        part = f"{key}.part-{uuid.uuid4().hex}"
        self._fs.put_file(str(local), part)
        try:
            self._fs.mv(part, key)
        except Exception:
            self._fs.rm(part)
            raise

    def put_folder(self, local: Path, key: str, files: list[str]) -> None:
        """Every file, then the manifest last: a reader that finds the manifest finds everything it lists."""
        for relative in files:
            self.put(local.joinpath(*relative.split("/")), f"{key}/{relative}")
        self.put(local / "MANIFEST.json", f"{key}/MANIFEST.json")

    def remove_folder(self, key: str) -> None:
        try:
            self._fs.rm(f"{key}/MANIFEST.json")  # first: the folder stops existing for readers at once
            self._fs.rm(key, recursive=True)
        except FileNotFoundError:
            pass

    def get(self, key: str, local: Path) -> None:
        self._fs.get_file(key, str(local))

    def remove(self, key: str) -> None:
        try:
            self._fs.rm(key)
        except FileNotFoundError:
            pass

    def exists(self, key: str) -> bool:
        return bool(self._fs.exists(key))
