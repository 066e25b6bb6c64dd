"""Reading a request body within a size limit, decompressing gzip/deflate bodies safely."""

from __future__ import annotations

import zlib

from starlette.requests import ClientDisconnect, Request

from app.errors import InvalidInput, TooLarge, UnsupportedFormat


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the request body is {declared} bytes; the limit is {limit} (SLIMSERVE_MAX_REQUEST_BYTES)")
    try:
        if declared is not None:
            body = await request.body()
        else:
            body = await _read_chunked(request, limit)
    except ClientDisconnect:
        raise InvalidInput("the client disconnected before sending the whole body") from None
    return decode_body(body, request.headers.get("content-encoding"), limit)


def decode_body(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Enforce the size limit and undo a Content-Encoding (the decompressed size counts against the limit)."""
    if len(body) > limit:
        raise TooLarge(f"the request body is larger than the limit of {limit} bytes (SLIMSERVE_MAX_REQUEST_BYTES)")
    if encoding is not None and encoding.lower() != "identity":
        body = _decompress(body, encoding.lower(), limit)
    return body


async def _read_chunked(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise TooLarge(f"the request body is larger than the limit of {limit} bytes (SLIMSERVE_MAX_REQUEST_BYTES)")
        chunks.append(chunk)
    return b"".join(chunks)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding == "gzip":
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        decoder = zlib.decompressobj()
    else:
        raise UnsupportedFormat(f"Content-Encoding '{encoding}' is not supported; use gzip, deflate or none")
    try:
        # max_length bounds the output, so a small compressed bomb cannot fill memory.
        data = decoder.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"the {encoding} body cannot be decompressed: {exc}") from None
    if len(data) > limit or decoder.unconsumed_tail:
        raise TooLarge(f"the decompressed body is larger than the limit of {limit} bytes")
    return data
