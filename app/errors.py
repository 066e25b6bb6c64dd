"""Typed service errors; each carries its HTTP status so every layer can raise them without FastAPI."""

from __future__ import annotations

from http import HTTPStatus


class SlimServeError(Exception):
    status_code: int = HTTPStatus.BAD_REQUEST
    code: str = "bad_request"

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InvalidInput(SlimServeError):
    """Malformed request: JSON, headers, tensor shapes or types."""

    status_code = HTTPStatus.BAD_REQUEST
    code = "invalid_input"


class InvalidContent(SlimServeError):
    """Well-formed request whose content cannot be accepted (a broken model file, a mismatched dataset)."""

    status_code = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "invalid_content"


class UnsupportedFormat(SlimServeError):
    status_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    code = "unsupported_format"


class TooLarge(SlimServeError):
    status_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "too_large"


class NotFound(SlimServeError):
    status_code = HTTPStatus.NOT_FOUND
    code = "not_found"


class ModelNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"model '{name}' not found")


class VariantNotFound(NotFound):
    def __init__(self, model: str, variant: str) -> None:
        super().__init__(f"model '{model}' has no variant '{variant}'")


class Conflict(SlimServeError):
    status_code = HTTPStatus.CONFLICT
    code = "conflict"


class Unauthorized(SlimServeError):
    status_code = HTTPStatus.UNAUTHORIZED
    code = "unauthorized"


class Forbidden(SlimServeError):
    status_code = HTTPStatus.FORBIDDEN
    code = "forbidden"


class NotReady(SlimServeError):
    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    code = "not_ready"


class InsufficientStorage(SlimServeError):
    status_code = HTTPStatus.INSUFFICIENT_STORAGE
    code = "insufficient_storage"


class Overloaded(SlimServeError):
    """Too many requests already waiting: answered at once (with Retry-After) instead of piling up latency."""

    status_code = HTTPStatus.TOO_MANY_REQUESTS
    code = "overloaded"


class InferenceTimeout(SlimServeError):
    """A prediction that ran past SLIMSERVE_INFERENCE_TIMEOUT_SECONDS; the server stopped it and goes on."""

    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    code = "inference_timeout"


class OutOfMemory(SlimServeError):
    """An inference needed more memory than the process may use; refused so the server keeps serving."""

    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    code = "out_of_memory"
