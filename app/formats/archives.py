"""Archive uploads (.zip, .tar, .tar.gz) holding one model folder: every member vetted, then unpacked privately.

Nothing is written before every member has been read and judged: names (no absolute paths, no `..`, no
backslashes or NUL bytes, no duplicates), kinds (regular files and directories only: no links, devices or
FIFOs), the member count and the unpacked total. Extraction then writes each file with O_EXCL into a fresh
folder of the caller's (a temp folder of the artifact store, removed on failure and swept after a crash),
counting bytes as they come, so an archive that lies about its sizes stops at its declared total.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from app.errors import InsufficientStorage, InvalidContent, TooLarge, UnsupportedFormat

_CHUNK = 1 << 20
# Written by archivers beside the content; never part of a model.
_JUNK_DIRS = ("__MACOSX",)
_JUNK_FILES = (".DS_Store", "Thumbs.db")


@dataclass(frozen=True)
class Member:
    name: str
    """Normalized relative POSIX path inside the archive."""
    size: int
    is_dir: bool


@dataclass(frozen=True)
class Unpacked:
    root: Path
    """The model folder: the archive's root, or its one top-level directory."""
    files: list[Path]
    total_bytes: int


def kind_of(path: Path) -> str | None:
    """'zip', 'tar' or 'tar.gz' by the file's bytes (never its name); None for anything else."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return None


def unpack(archive: Path, target: Path, *, label: str, max_bytes: int, max_members: int,
           free_bytes: Callable[[], int]) -> Unpacked:
    """Vet every member of `archive`, then unpack it into the empty folder `target`.

    Raises:
        UnsupportedFormat: not a zip or tar archive (or a gzip stream that is not a tar).
        InvalidContent: a member is unsafe or the archive is corrupt; the message names the member.
        TooLarge: more members than `max_members`, or more unpacked bytes than `max_bytes`.
        InsufficientStorage: the unpacked total does not fit on the disk.
    """
    kind = kind_of(archive)
    if kind is None:
        raise UnsupportedFormat(f"{label} is not a zip, tar or tar.gz archive")
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as bundle:
                infos = bundle.infolist()
                members = _vet([_zip_member(info) for info in infos], label, max_bytes, max_members)
                _check_space(members, free_bytes, label)
                by_name = {_normal(info.filename).rstrip("/"): info for info in infos}
                return _extract(target, members, lambda name: bundle.open(by_name[name]), label)
        with tarfile.open(archive, "r:gz" if kind == "tar.gz" else "r:") as bundle:
            entries = bundle.getmembers()  # for tar.gz: one full pass over the stream before anything is written
            members = _vet([_tar_member(info) for info in entries], label, max_bytes, max_members)
            _check_space(members, free_bytes, label)
            files = {_normal(info.name).rstrip("/"): info for info in entries if info.isreg()}
            return _extract(target, members, lambda name: _tar_file(bundle, files[name], name), label)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the disk, not the archive: the store maps it
        raise InvalidContent(f"{label} is a corrupt {kind} archive: {exc}") from None


# ---- reading members ---------------------------------------------------------------------------------------------


def _zip_member(info: zipfile.ZipInfo) -> tuple[str, int, str]:
    file_type = stat.S_IFMT(info.external_attr >> 16)  # zero when the archiver recorded permissions only
    if info.is_dir():
        kind = "dir"
    elif file_type and file_type not in (stat.S_IFREG, stat.S_IFDIR):
        kind = "link" if file_type == stat.S_IFLNK else "special"
    else:
        kind = "file"
    return info.filename, info.file_size, kind


def _tar_member(info: tarfile.TarInfo) -> tuple[str, int, str]:
    if info.isdir():
        return info.name, 0, "dir"
    if info.isreg():
        return info.name, info.size, "file"
    return info.name, info.size, "link" if info.issym() or info.islnk() else "special"


def _tar_file(bundle: tarfile.TarFile, info: tarfile.TarInfo, name: str) -> IO[bytes]:
    handle = bundle.extractfile(info)
    if handle is None:
        raise InvalidContent(f"member '{name}' cannot be read from the archive")
    return handle


# ---- vetting -----------------------------------------------------------------------------------------------------


def _normal(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def _vet(raw: list[tuple[str, int, str]], label: str, max_bytes: int, max_members: int) -> list[Member]:
    if len(raw) > max_members:
        raise TooLarge(f"{label} has {len(raw)} members; the limit is {max_members} (SLIMSERVE_MAX_ARCHIVE_MEMBERS)")
    members: list[Member] = []
    seen: set[str] = set()
    total = 0
    for name, size, kind in raw:
        shown = name[:200]
        if kind == "link":
            raise InvalidContent(f"{label}: member '{shown}' is a link; archives may hold only files and folders")
        if kind == "special":
            raise InvalidContent(f"{label}: member '{shown}' is a device, FIFO or socket; archives may hold only "
                                 "files and folders")
        clean = _normal(name).rstrip("/")
        if not clean or clean == ".":
            continue
        if "\x00" in clean or "\\" in clean or clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
            raise InvalidContent(f"{label}: member '{shown}' has an absolute or malformed path")
        parts = PurePosixPath(clean).parts
        if any(part in ("..", ".") for part in parts):
            raise InvalidContent(f"{label}: member '{shown}' points outside the archive ('..' in its path)")
        if parts[0] in _JUNK_DIRS or parts[-1] in _JUNK_FILES:
            continue
        if clean in seen:
            raise InvalidContent(f"{label}: member '{shown}' appears twice")
        seen.add(clean)
        total += size
        if total > max_bytes:
            raise TooLarge(f"{label} unpacks to more than {max_bytes} bytes (SLIMSERVE_MAX_UNPACKED_BYTES); "
                           f"member '{shown}' passes the limit")
        members.append(Member(clean, size, kind == "dir"))
    files = [m for m in members if not m.is_dir]
    if not files:
        raise InvalidContent(f"{label} holds no files")
    file_names = {f.name for f in files}
    for member in files:  # a file and a folder of the same name cannot both be unpacked
        for parent in PurePosixPath(member.name).parents:
            if str(parent) != "." and str(parent) in file_names:
                raise InvalidContent(f"{label}: member '{member.name[:200]}' lies inside the file '{parent}'")
    return members


def _check_space(members: list[Member], free_bytes: Callable[[], int], label: str) -> None:
    needed = sum(m.size for m in members)
    free = free_bytes()
    if needed > free:
        raise InsufficientStorage(f"{label} unpacks to {needed} bytes and the server has {free} bytes free; "
                                  "nothing was stored")


# ---- extraction --------------------------------------------------------------------------------------------------


def _extract(target: Path, members: list[Member], open_member: Callable[[str], IO[bytes]], label: str) -> Unpacked:
    target.mkdir(parents=True, exist_ok=False)
    written: list[Path] = []
    total = 0
    for member in members:
        destination = target.joinpath(*PurePosixPath(member.name).parts)
        if member.is_dir:
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        with open_member(member.name) as source:
            total += _copy(source, destination, member, label)
        written.append(destination)
    return Unpacked(_model_root(target), written, total)


def _copy(source: IO[bytes], destination: Path, member: Member, label: str) -> int:
    size = 0
    descriptor = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as output:
        for chunk in iter(lambda: source.read(_CHUNK), b""):
            size += len(chunk)
            if size > member.size:
                raise InvalidContent(f"{label}: member '{member.name[:200]}' holds more bytes than its header says")
            output.write(chunk)
        output.flush()
        os.fsync(output.fileno())
    return size


def _model_root(folder: Path) -> Path:
    """The folder itself, or its single top-level directory when everything lies inside one."""
    entries = list(folder.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return folder


class _Chunks:
    """A write-only file object that hands what tarfile writes to a generator, chunk by chunk."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.pending.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self.pending = b"".join(self.pending), []
        return data


def tar_chunks(folder: Path, prefix: str, skip: tuple[str, ...] = ()) -> Iterator[bytes]:
    """An uncompressed tar of `folder` (members under `prefix/`), produced as it is read: never whole in memory."""
    sink = _Chunks()
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as bundle:  # type: ignore[call-overload]
        for path in walk_files(folder):
            if path.name in skip:
                continue
            info = tarfile.TarInfo(f"{prefix}/{path.relative_to(folder).as_posix()}")
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, int(path.stat().st_mtime)
            with open(path, "rb") as handle:
                bundle.addfile(info, handle)
                yield sink.take()
    yield sink.take()


def walk_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
