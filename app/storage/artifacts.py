"""Content-addressed artifact store: stream to a temp file, hash on the way, fsync, rename into place."""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

from app.errors import InsufficientStorage, TooLarge
from app.storage.remote import RemoteArtifacts

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = re.compile(r"^\.[a-z0-9]{1,8}$")
MODEL_FILE = ".onnx"
MODEL_FOLDER = ".onnxd"
"""An ONNX model of several files (external data): a folder artifact whose entry is `model.onnx`."""
MODEL_ENTRY = "model.onnx"
MANIFEST = "MANIFEST.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(exc: OSError) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage("the server's storage is full; nothing was stored")
    return exc


class TempWriter:
    """A temp file being written from a stream; knows its size and sha256 when closed."""

    def __init__(self, path: Path, max_bytes: int, what: str) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._what = what
        self._hash = hashlib.sha256()
        self.size = 0
        self._file = open(path, "xb")  # noqa: SIM115 - closed in close()/discard()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._max_bytes:
            raise TooLarge(f"{self._what} is larger than the limit of {self._max_bytes} bytes")
        self._hash.update(chunk)
        try:
            self._file.write(chunk)
        except OSError as exc:
            raise _storage_error(exc) from exc

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        """Flush and fsync, so that a rename after this never exposes a partial file."""
        if self._file.closed:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise _storage_error(exc) from exc
        finally:
            self._file.close()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


class ArtifactStore:
    """Files named by their sha256 under `<root>/artifacts`; temp files under `<root>/tmp`.

    With a remote (shared storage), the remote holds every artifact and `<root>/artifacts` is this node's cache:
    files are uploaded when committed and fetched, checked against their hash, when first read.
    """

    def __init__(self, root: Path, remote: RemoteArtifacts | None = None) -> None:
        self.root = root.resolve()
        self._remote = remote
        self._artifacts = self.root / "artifacts"
        self._tmp = self.root / "tmp"
        self._artifacts.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        # Each process holds a lock on its own token: a leftover whose lock can be taken is an orphan,
        # whatever pid the next process happens to get (a container restarts as the same pid).
        self._owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._owner_lock = open(self._tmp / f"{self._owner}.lock", "w")  # noqa: SIM115 - held for life
        fcntl.flock(self._owner_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def path(self, sha256: str, suffix: str) -> Path:
        if not _SHA256.match(sha256) or not _SUFFIX.match(suffix):
            raise ValueError(f"not an artifact key: {sha256!r}{suffix!r}")
        return self._artifacts / sha256[:2] / f"{sha256}{suffix}"

    def exists(self, sha256: str, suffix: str) -> bool:
        if self._remote is not None:
            return self._remote.exists(self._remote.key(sha256, suffix))
        return self.path(sha256, suffix).is_file()

    def local(self, sha256: str, suffix: str) -> Path:
        """The artifact as a local file; from shared storage it is fetched into the cache first (blocking)."""
        path = self.path(sha256, suffix)
        if path.is_file() or self._remote is None:
            return path
        temp = self.temp_path(suffix)
        try:
            self._fetch(self._remote.key(sha256, suffix), temp, sha256, f"artifact {sha256[:12]}")
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, path)
        except FileNotFoundError:
            log.warning("artifact %s%s is missing from shared storage", sha256[:12], suffix)
        finally:
            temp.unlink(missing_ok=True)
        return path

    def _fetch(self, key: str, local: Path, sha256: str, what: str) -> None:
        """A file from shared storage, refused unless it has the hash it is stored under."""
        assert self._remote is not None
        self._remote.get(key, local)
        if _file_sha256(local) != sha256:
            raise OSError(f"{what} from shared storage does not match its hash")

    # -- folders: a model of several files ----------------------------------------------------------------------

    def commit_folder(self, folder: Path, suffix: str) -> tuple[str, int, Path]:
        """Move a finished folder into place under the hash of its manifest: (sha256, total bytes, path).

        The manifest lists every file with its size and sha256; its own hash names the folder, so equal content
        is one artifact and a folder is never published half-written (rename of the whole folder).
        """
        entries: list[dict[str, Any]] = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
            entries.append({"path": path.relative_to(folder).as_posix(), "size": path.stat().st_size,
                            "sha256": digest.hexdigest()})
        manifest = json.dumps({"files": entries}, sort_keys=True, separators=(",", ":")).encode()
        sha = hashlib.sha256(manifest).hexdigest()
        target = self.path(sha, suffix)
        try:
            (folder / MANIFEST).write_bytes(manifest)
            for path in folder.rglob("*"):
                if path.is_file():
                    with open(path, "rb") as handle:
                        os.fsync(handle.fileno())
            if (target / MANIFEST).is_file():
                shutil.rmtree(folder)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(target, ignore_errors=True)  # a folder without its manifest is a crashed leftover
                os.replace(folder, target)
                _fsync_dir(target.parent)
            if self._remote is not None:
                self._remote.put_folder(target, self._remote.key(sha, suffix), [e["path"] for e in entries])
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise _storage_error(exc) from exc
        return sha, sum(int(e["size"]) for e in entries), target

    def local_folder(self, sha256: str, suffix: str) -> Path:
        """A folder artifact on this node; from shared storage it is fetched (and checked) first."""
        path = self.path(sha256, suffix)
        if (path / MANIFEST).is_file() or self._remote is None:
            return path
        temp = self.temp_path(suffix)
        try:
            key = self._remote.key(sha256, suffix)
            temp.mkdir(parents=True)
            self._remote.get(f"{key}/{MANIFEST}", temp / MANIFEST)
            manifest = (temp / MANIFEST).read_bytes()
            if hashlib.sha256(manifest).hexdigest() != sha256:
                raise OSError(f"artifact {sha256[:12]} from shared storage does not match its hash")
            for entry in json.loads(manifest)["files"]:
                local = temp.joinpath(*entry["path"].split("/"))
                local.parent.mkdir(parents=True, exist_ok=True)
                self._fetch(f"{key}/{entry['path']}", local, entry["sha256"],
                            f"file {entry['path']} of artifact {sha256[:12]}")
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, path)
        except FileNotFoundError:
            log.warning("artifact %s%s is missing from shared storage", sha256[:12], suffix)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        return path

    def model(self, sha256: str) -> Path:
        """The ONNX file of a stored model: one file, or the entry of a folder model (external data beside it)."""
        single = self.path(sha256, MODEL_FILE)
        if single.is_file():
            return single
        folder = self.path(sha256, MODEL_FOLDER)
        if (folder / MANIFEST).is_file():
            return folder / MODEL_ENTRY
        if self._remote is not None and self._remote.exists(self._remote.key(sha256, MODEL_FOLDER) + f"/{MANIFEST}"):
            return self.local_folder(sha256, MODEL_FOLDER) / MODEL_ENTRY
        return self.local(sha256, MODEL_FILE)

    def remove_model(self, sha256: str) -> None:
        self.remove(sha256, MODEL_FILE)
        self.remove_folder(sha256, MODEL_FOLDER)

    def remove_folder(self, sha256: str, suffix: str) -> None:
        shutil.rmtree(self.path(sha256, suffix), ignore_errors=True)
        if self._remote is not None:
            self._remote.remove_folder(self._remote.key(sha256, suffix))

    def pin(self, path: Path) -> Path:
        """A private copy of an artifact (file, or folder model's entry): deleting the model meanwhile cannot pull
        it from under a job. Remove it with `unpin`.

        Files are hard-linked; a folder model's files are copied, because onnx refuses external data with more
        than one link (its guard against hard-link attacks).
        """
        if path.name == MODEL_ENTRY and path.parent.name.endswith(MODEL_FOLDER):
            private = self.temp_path(MODEL_FOLDER)
            private.mkdir()
            for source in path.parent.rglob("*"):
                if source.is_file() and source.name != MANIFEST:
                    target = private / source.relative_to(path.parent)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, target)
            return private / MODEL_ENTRY
        private = self.temp_path(path.suffix)
        _link_or_copy(path, private)
        return private

    @staticmethod
    def unpin(path: Path) -> None:
        if path.name == MODEL_ENTRY and path.parent.name.endswith(f"{MODEL_FOLDER}.part"):
            shutil.rmtree(path.parent, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def _publish(self, path: Path, sha256: str, suffix: str) -> None:
        if self._remote is not None:
            self._remote.put(path, self._remote.key(sha256, suffix))

    def open_temp(self, *, max_bytes: int, what: str) -> TempWriter:
        path = self._tmp / f"{self._owner}.{uuid.uuid4().hex}.part"
        try:
            return TempWriter(path, max_bytes, what)
        except OSError as exc:
            raise _storage_error(exc) from exc

    def commit(self, temp: TempWriter, suffix: str) -> Path:
        """Move a closed, validated temp file into place under its hash (idempotent for equal content)."""
        temp.close()
        target = self.path(temp.sha256, suffix)
        try:
            if target.is_file() and target.stat().st_size == temp.size:
                temp.discard()
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(temp.path, target)
                _fsync_dir(target.parent)
            self._publish(target, temp.sha256, suffix)
        except OSError as exc:
            temp.discard()
            raise _storage_error(exc) from exc
        return target

    def free_bytes(self) -> int:
        """What the disk holding the store has free (its real upload limit)."""
        return shutil.disk_usage(self.root).free

    def temp_path(self, suffix: str = ".part") -> Path:
        """A fresh path in the temp folder under this process's owner token, for tools that write files."""
        return self._tmp / f"{self._owner}.{uuid.uuid4().hex}{suffix}.part"

    def adopt(self, path: Path, suffix: str) -> tuple[str, int, Path]:
        """Hash a finished file written by a tool, fsync it and move it into place: (sha256, size, path)."""
        digest = hashlib.sha256()
        size = 0
        try:
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
                os.fsync(handle.fileno())
            target = self.path(digest.hexdigest(), suffix)
            if target.is_file() and target.stat().st_size == size:
                path.unlink(missing_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
                _fsync_dir(target.parent)
            self._publish(target, digest.hexdigest(), suffix)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise _storage_error(exc) from exc
        return digest.hexdigest(), size, target

    def write_bytes(self, data: bytes, suffix: str, what: str) -> tuple[str, Path]:
        temp = self.open_temp(max_bytes=len(data) + 1, what=what)
        try:
            temp.write(data)
            return temp.sha256, self.commit(temp, suffix)
        except BaseException:
            temp.discard()
            raise

    def remove(self, sha256: str, suffix: str) -> None:
        self.path(sha256, suffix).unlink(missing_ok=True)
        if self._remote is not None:
            self._remote.remove(self._remote.key(sha256, suffix))

    def clean_leftovers(self) -> int:
        """Delete temp files left by processes of this host that are gone (crashed mid-upload or mid-job)."""
        prefix = f"{socket.gethostname()}-"
        removed = 0
        for lock_path in self._tmp.glob(f"{glob.escape(prefix)}*.lock"):
            owner = lock_path.name[: -len(".lock")]
            if owner == self._owner or not _owner_is_gone(lock_path):
                continue
            for leftover in self._tmp.glob(f"{glob.escape(owner)}.*"):
                if leftover != lock_path:
                    if leftover.is_dir():  # an unpacked archive or a pinned folder model
                        shutil.rmtree(leftover, ignore_errors=True)
                    else:
                        leftover.unlink(missing_ok=True)
                    removed += 1
            lock_path.unlink(missing_ok=True)
        if removed:
            log.info("removed %d temp files left by interrupted uploads or jobs", removed)
        return removed

    def close(self) -> None:
        self._owner_lock.close()
        (self._tmp / f"{self._owner}.lock").unlink(missing_ok=True)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _owner_is_gone(lock_path: Path) -> bool:
    try:
        with open(lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
    except BlockingIOError:
        return False
    except FileNotFoundError:
        return False
