from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.errors import TooLarge
from app.storage.artifacts import ArtifactStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ArtifactStore]:
    opened = ArtifactStore(tmp_path)
    yield opened
    opened.close()


def test_commit_names_the_file_by_its_hash(store: ArtifactStore, tmp_path: Path) -> None:
    temp = store.open_temp(max_bytes=100, what="test")
    temp.write(b"hello ")
    temp.write(b"world")
    path = store.commit(temp, ".bin")
    assert path == store.path(hashlib.sha256(b"hello world").hexdigest(), ".bin")
    assert path.read_bytes() == b"hello world"
    assert not temp.path.exists()
    # Same content again: the existing file stays, the temp goes.
    sha, again = store.write_bytes(b"hello world", ".bin", "test")
    assert again == path and len(list(path.parent.iterdir())) == 1


def test_writer_enforces_its_limit(store: ArtifactStore, tmp_path: Path) -> None:
    temp = store.open_temp(max_bytes=4, what="the upload")
    with pytest.raises(TooLarge, match="the upload"):
        temp.write(b"12345")
    temp.discard()
    assert list((tmp_path / "tmp").glob("*.part")) == []


def test_paths_never_leave_the_store(store: ArtifactStore, tmp_path: Path) -> None:
    for key, suffix in (("../../etc/passwd", ".onnx"), ("a" * 64, "/../x"), ("A" * 64, ".onnx")):
        with pytest.raises(ValueError):
            store.path(key, suffix)


def test_leftovers_of_dead_processes_are_removed_but_live_ones_kept(tmp_path: Path) -> None:
    live = ArtifactStore(tmp_path)
    live_temp = live.open_temp(max_bytes=100, what="t")
    live_temp.write(b"in progress")
    # A process that crashed: its lock file exists but nobody holds it.
    dead_owner = f"{socket.gethostname()}-{os.getpid() + 100000}-deadbeef"
    (tmp_path / "tmp" / f"{dead_owner}.lock").touch()
    leftover = tmp_path / "tmp" / f"{dead_owner}.0123.part"
    leftover.write_bytes(b"half a model")
    other_host = tmp_path / "tmp" / "some-other-host-1-aaaa.0123.part"
    other_host.write_bytes(b"not ours to judge")

    restarted = ArtifactStore(tmp_path)
    assert restarted.clean_leftovers() == 1
    assert not leftover.exists()
    assert live_temp.path.exists() and other_host.exists()
    live_temp.discard()
    live.close()
    restarted.close()
