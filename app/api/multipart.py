"""Streams a multipart upload straight into temp files of the artifact store, never the whole body in memory."""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.errors import InsufficientStorage, InvalidInput, TooLarge, UnsupportedFormat
from app.storage.artifacts import ArtifactStore, TempWriter

MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 16


@dataclass
class UploadedFile:
    filename: str
    temp: TempWriter


@dataclass
class UploadForm:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, UploadedFile] = field(default_factory=dict)

    def discard(self) -> None:
        for upload in self.files.values():
            upload.temp.discard()


class _FormBuilder:
    """python-multipart callbacks that route file parts to temp files and text parts to memory."""

    def __init__(self, store: ArtifactStore, file_fields: set[str], max_bytes: int) -> None:
        self.form = UploadForm()
        self._store = store
        self._file_fields = file_fields
        self._max_bytes = max_bytes
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._text = bytearray()
        self._file: TempWriter | None = None
        self._parts = 0

    def on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise InvalidInput(f"too many parts in the form (limit {MAX_PARTS})")
        self._disposition = b""
        self._text = bytearray()
        self._file = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        if len(self._header_value) > MAX_FIELD_BYTES:
            raise InvalidInput("a multipart header is too long")

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        raw_name = options.get(b"name")
        if raw_name is None:
            raise InvalidInput("a form part has no name in its Content-Disposition header")
        self._name = raw_name.decode("utf-8", "replace")
        if self._name in self.form.fields or self._name in self.form.files:
            raise InvalidInput(f"form field '{self._name}' is given twice")
        if self._name in self._file_fields:
            filename = options.get(b"filename", b"").decode("utf-8", "replace")
            self._file = self._store.open_temp(max_bytes=self._max_bytes, what="the upload")
            self.form.files[self._name] = UploadedFile(filename=filename, temp=self._file)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.write(data[start:end])
            return
        self._text += data[start:end]
        if len(self._text) > MAX_FIELD_BYTES:
            raise TooLarge(f"form field '{self._name}' is longer than {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if self._file is None:
            self.form.fields[self._name] = self._text.decode("utf-8", "replace")


async def read_upload_form(
    request: Request, *, store: ArtifactStore, file_fields: set[str], max_bytes: int
) -> UploadForm:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise UnsupportedFormat("uploads must be sent as multipart/form-data (curl -F file=@model.onnx -F name=...)")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise TooLarge(f"the upload is {declared} bytes; the limit is {max_bytes} bytes (SLIMSERVE_MAX_UPLOAD_BYTES)")
    if declared is not None and declared.isdigit() and int(declared) > store.free_bytes():
        # before a byte is read: the disk, not a configured limit, is what bounds a model of tens of GB
        raise InsufficientStorage(f"the upload is {declared} bytes and the server has {store.free_bytes()} bytes "
                                  "free; nothing was stored")
    builder = _FormBuilder(store, file_fields, max_bytes)
    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": builder.on_part_begin,
            "on_part_data": builder.on_part_data,
            "on_part_end": builder.on_part_end,
            "on_header_field": builder.on_header_field,
            "on_header_value": builder.on_header_value,
            "on_header_end": builder.on_header_end,
            "on_headers_finished": builder.on_headers_finished,
        },
    )
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise TooLarge(f"the upload is larger than the limit of {max_bytes} bytes (SLIMSERVE_MAX_UPLOAD_BYTES)")
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        builder.form.discard()
        raise InvalidInput(f"the multipart body is malformed: {exc}") from None
    except ClientDisconnect:
        builder.form.discard()
        raise InvalidInput("the client disconnected before the upload finished") from None
    except BaseException:
        builder.form.discard()
        raise
    return builder.form
