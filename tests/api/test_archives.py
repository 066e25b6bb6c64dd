"""Archive uploads: an ONNX model with its external data, stored as a folder, served, compressed, downloaded;
and every hostile archive refused with 4xx naming the member, nothing stored."""

from __future__ import annotations

import io
import subprocess
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.helpers import CNN, CNN_SAMPLES
from tests.worker.helpers import wait_for_job


def _external(folder: Path, name: str = "cnn.onnx", location: str = "weights.bin") -> Path:
    """The digits CNN saved as exporters save large models: the graph in one file, the weights in another."""
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(CNN))
    onnx.save_model(model, str(folder / name), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)  # what onnx and torch.onnx write by default
    return folder / name


def _zip(members: dict[str, bytes], **special: zipfile.ZipInfo) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
        for info in special.values():
            bundle.writestr(info, b"target")
    return buffer.getvalue()


def _tar(members: dict[str, bytes], gzip: bool = False, extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gzip else "w") as bundle:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
        for info in extra or []:
            bundle.addfile(info)
    return buffer.getvalue()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _post(client: TestClient, name: str, data: bytes, filename: str, samples: bytes | None = None) -> Any:
    files: dict[str, Any] = {"file": (filename, data)}
    if samples is not None:
        files["samples"] = ("samples.npz", samples)
    return client.post("/models", data={"name": name}, files=files)


def _stored(settings: Settings) -> set[Path]:
    return {p for p in (settings.data_dir / "artifacts").rglob("*") if p.is_file()}


def test_an_onnx_model_with_external_data_is_stored_as_a_folder_served_and_downloaded_as_a_tar(
    client: TestClient, settings: Settings, tmp_path: Path,
) -> None:
    folder = tmp_path / "export"
    _external(folder)
    response = _post(client, "cnn", _zip({f"export/{k}": v for k, v in _files(folder).items()}), "cnn.zip",
                     CNN_SAMPLES.read_bytes())
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["format"] == "onnx" and model["size_bytes"] > 200_000
    images = np.load(CNN_SAMPLES)["input"][:4]
    got = client.post("/models/cnn/predict", json={"inputs": {"input": images.tolist()}}).json()["outputs"]["logits"]
    want = ort.InferenceSession(str(CNN)).run(None, {"input": images})[0]
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=1e-5)
    stored = {p.name for p in _stored(settings)}
    assert {"model.onnx", "weights.bin", "MANIFEST.json"} <= stored

    download = client.get("/models/cnn/variants/original/artifact")
    assert download.status_code == 200 and download.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(download.content)) as bundle:
        assert sorted(bundle.getnames()) == ["cnn-original/model.onnx", "cnn-original/weights.bin"]
        bundle.extractall(tmp_path / "back", filter="data")
    again = ort.InferenceSession(str(tmp_path / "back" / "cnn-original" / "model.onnx")).run(None, {"input": images})
    np.testing.assert_allclose(again[0], want, atol=1e-5)

    job = client.post("/models/cnn/compressions", json={"recipe": "int8-static"}).json()
    done = wait_for_job(client, job["id"], timeout=180)
    assert done["state"] == "succeeded", done["error"]
    assert client.get(f"/models/cnn/variants/{done['variant']}/artifact").headers["content-type"] == \
        "application/octet-stream"  # the compressed variant fits in one file


def test_a_tar_gz_with_the_model_at_its_root_and_a_zip_of_one_file(client: TestClient, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    _external(folder, "model.onnx", "model.onnx.data")
    assert _post(client, "targz", _tar(_files(folder), gzip=True), "m.tar.gz").status_code == 201
    single = _post(client, "single", _zip({"m/model.onnx": CNN.read_bytes(), "m/README.md": b"docs"}), "m.zip")
    assert single.status_code == 201, single.text
    assert client.get("/models/single/variants/original/artifact").headers["content-type"] == \
        "application/octet-stream"
    deleted = client.delete("/models/targz")
    assert deleted.status_code == 204


def _symlink() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("m/link")
    info.external_attr = (0o120777 << 16)
    return info


def _device() -> tarfile.TarInfo:
    info = tarfile.TarInfo("m/null")
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info


def _hardlink() -> tarfile.TarInfo:
    info = tarfile.TarInfo("m/hard")
    info.type, info.linkname = tarfile.LNKTYPE, "m/model.onnx"
    return info


HOSTILE: list[tuple[str, Callable[[Path], tuple[bytes, str]], int, str]] = [
    ("dot-dot", lambda _t: (_zip({"m/../../evil.onnx": CNN.read_bytes()}), "a.zip"), 422, "'..'"),
    ("absolute", lambda _t: (_tar({"/etc/evil.onnx": CNN.read_bytes()}), "a.tar"), 422, "absolute"),
    ("symlink", lambda _t: (_zip({"m/model.onnx": CNN.read_bytes()}, link=_symlink()), "a.zip"), 422, "link"),
    ("device", lambda _t: (_tar({"m/model.onnx": CNN.read_bytes()}, extra=[_device()]), "a.tar"), 422, "device"),
    ("hard link", lambda _t: (_tar({"m/model.onnx": CNN.read_bytes()}, extra=[_hardlink()]), "a.tar"), 422, "link"),
    ("duplicate", lambda _t: (_tar({"m/model.onnx": CNN.read_bytes(), "./m/model.onnx": b"x"}), "a.tar"), 422,
     "appears twice"),
    ("two models", lambda _t: (_zip({"a.onnx": CNN.read_bytes(), "b.onnx": CNN.read_bytes()}), "a.zip"), 422,
     "2 .onnx files"),
    ("no model", lambda _t: (_zip({"m/notes.txt": b"hello"}), "a.zip"), 422, "no .onnx model"),
    ("corrupt zip", lambda _t: (b"PK\x03\x04" + b"\x00" * 300, "a.zip"), 422, "corrupt zip"),
    ("gzip of no tar", lambda _t: (__import__("gzip").compress(b"not a tar at all" * 50), "a.tar.gz"), 422,
     "corrupt tar.gz"),
    ("data outside", lambda t: (_zip({"m/model.onnx": _pointing_at(t, "../weights.bin"),
                                      "weights.bin": b"\x00" * 64}), "a.zip"), 422, "outside the archive"),
    ("data missing", lambda t: (_zip({"m/model.onnx": _pointing_at(t, "gone.bin")}), "a.zip"), 422,
     "does not hold"),
]


def _pointing_at(tmp_path: Path, location: str) -> bytes:
    path = _external(tmp_path / "pointing", "model.onnx", "real.bin")
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    serialized: bytes = model.SerializeToString()
    return serialized


@pytest.mark.parametrize(("case", "build", "status", "message"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_archives_are_refused_naming_the_member_and_nothing_is_stored(
    client: TestClient, settings: Settings, tmp_path: Path, case: str, build: Callable[[Path], tuple[bytes, str]],
    status: int, message: str,
) -> None:
    before = _stored(settings)
    data, filename = build(tmp_path)
    response = _post(client, "evil", data, filename)
    assert response.status_code == status and message in response.json()["error"], (case, response.text)
    assert _stored(settings) == before
    assert [p for p in (settings.data_dir / "tmp").iterdir() if not p.name.endswith(".lock")] == []
    assert client.get("/models/evil").status_code == 404
    assert not (tmp_path.parent / "evil.onnx").exists() and not Path("/etc/evil.onnx").exists()


@pytest.fixture
def small_client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    settings = make_settings(max_archive_members=3, max_unpacked_bytes=100_000)
    with TestClient(create_app(settings)) as client:
        yield client


def test_member_count_and_unpacked_total_are_capped(small_client: TestClient) -> None:
    many = _post(small_client, "many", _zip({f"m/{i}.txt": b"x" for i in range(5)}), "a.zip")
    assert many.status_code == 413 and "5 members" in many.json()["error"]
    big = _post(small_client, "big", _zip({"m/model.onnx": CNN.read_bytes()}), "a.zip")  # 235 kB > 100 kB
    assert big.status_code == 413 and "member 'm/model.onnx'" in big.json()["error"]


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 6 MB file system (tmpfs), so a full disk is a full disk."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_an_upload_larger_than_the_free_disk_is_refused_before_it_is_read(
    make_settings: Callable[..., Settings], tiny_disk: Path, tmp_path: Path,
) -> None:
    with TestClient(create_app(make_settings(data_dir=tiny_disk / "data"))) as client:
        too_big = _post(client, "big", b"\x00" * (8 * 1024 * 1024), "big.onnx")
        assert too_big.status_code == 507 and "free" in too_big.json()["error"]
        # an archive that fits on the disk packed but not unpacked: refused before anything is unpacked
        bomb = io.BytesIO()
        with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
            bundle.writestr("m/model.onnx", b"\x00" * (7 * 1024 * 1024))
        unpacked = _post(client, "bomb", bomb.getvalue(), "bomb.zip")
        assert unpacked.status_code == 507 and "unpacks to" in unpacked.json()["error"]
        assert _post(client, "cnn", CNN.read_bytes(), "cnn.onnx").status_code == 201  # small ones still fit
