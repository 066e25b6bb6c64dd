from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.errors import TooLarge
from app.storage.artifacts import ArtifactStore
from tests.helpers import REPO


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


_UNPACK_CHILD = """
import sys
from pathlib import Path
from app.formats import archives
from app.storage.artifacts import ArtifactStore
store = ArtifactStore(Path(sys.argv[1]))
archives.unpack(Path(sys.argv[2]), store.temp_path(".unpack"), label="the archive", max_bytes=1 << 40,
                max_members=100, free_bytes=store.free_bytes)
"""


def test_an_unpack_killed_midway_leaves_nothing_after_the_next_start(tmp_path: Path) -> None:
    archive = tmp_path / "big.tar.gz"
    with tarfile.open(archive, "w:gz") as bundle:  # 384 MB of zeros: a second to unpack, 400 kB to store
        for index in range(3):
            info = tarfile.TarInfo(f"m/part{index}.bin")
            info.size = 128 * 1024 * 1024
            bundle.addfile(info, _Zeros(info.size))
    root = tmp_path / "store"
    child = subprocess.Popen([sys.executable, "-c", _UNPACK_CHILD, str(root), str(archive)], cwd=REPO)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list((root / "tmp").glob("*.unpack.part/m/part1.bin")):
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert list((root / "tmp").glob("*.unpack.part/m/*.bin")), "the child was killed before it unpacked anything"

    restarted = ArtifactStore(root)
    try:
        assert restarted.clean_leftovers() == 1
        assert [p.name for p in (root / "tmp").iterdir() if not p.name.endswith(".lock")] == []
        assert not list((root / "artifacts").rglob("*.bin"))
    finally:
        restarted.close()


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self._left = size

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        count = min(len(buffer), self._left)
        buffer[:count] = bytes(count)
        self._left -= count
        return count
