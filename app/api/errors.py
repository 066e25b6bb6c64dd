"""One JSON error shape for every failure: {"error": message, "code": snake_case}."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.responses import OrjsonResponse
from app.errors import SlimServeError

log = logging.getLogger(__name__)


def error_response(status_code: int, message: str, code: str, headers: dict[str, str] | None = None) -> OrjsonResponse:
    return OrjsonResponse({"error": message, "code": code}, status_code=status_code, headers=headers)


async def _slimserve_error(_request: Request, exc: Exception) -> OrjsonResponse:
    assert isinstance(exc, SlimServeError)
    headers = {"Retry-After": "1"} if exc.status_code in (429, 503) else None
    return error_response(exc.status_code, exc.message, exc.code, headers)


async def _validation_error(_request: Request, exc: Exception) -> OrjsonResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        problems.append(f"{location}: {error.get('msg', 'invalid')}" if location else str(error.get("msg")))
    return error_response(HTTPStatus.UNPROCESSABLE_ENTITY, "; ".join(problems) or "invalid request", "invalid_request")


async def _http_error(_request: Request, exc: Exception) -> OrjsonResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
    return error_response(exc.status_code, str(exc.detail), code, dict(exc.headers or {}))


async def _database_error(_request: Request, exc: Exception) -> OrjsonResponse:
    # Management calls need the database; predictions of loaded models do not and keep answering.
    log.warning("metadata database unavailable: %s", str(exc).splitlines()[0][:200])
    return error_response(HTTPStatus.SERVICE_UNAVAILABLE, "the metadata database is unavailable; retry shortly",
                          "database_unavailable", {"Retry-After": "5"})


async def _unexpected_error(request: Request, exc: Exception) -> OrjsonResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(HTTPStatus.INTERNAL_SERVER_ERROR, "internal server error", "internal")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(SlimServeError, _slimserve_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(Exception, _unexpected_error)
