"""The one error shape: ``{"message": "...", "errors": {"field": "why"}}``.

Services raise :class:`PMSError` subclasses; :func:`install_error_handlers` maps them (and
FastAPI's own validation and HTTP errors) to that shape. Nothing else turns exceptions into
statuses, and no handler ever returns a stack trace.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg_pool import PoolTimeout
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class PMSError(Exception):
    """An error with an HTTP status and optional per-field reasons."""

    status: int = 500
    default_message = "Internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        errors: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.errors = errors or {}
        self.headers = headers or {}
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"message": self.message, "errors": self.errors}


class BadRequest(PMSError):
    status = 400
    default_message = "Invalid request"


class Unauthorized(PMSError):
    status = 401
    default_message = "Authentication required"

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kwargs)


class Forbidden(PMSError):
    status = 403
    default_message = "Not allowed for your role"


class NotFound(PMSError):
    status = 404
    default_message = "Not found"


class Conflict(PMSError):
    status = 409
    default_message = "Conflict"


class PayloadTooLarge(PMSError):
    status = 413
    default_message = "Request body too large"


class TooManyRequests(PMSError):
    status = 429
    default_message = "Too many requests"

    def __init__(self, message: str | None = None, *, retry_after: int, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"Retry-After": str(max(1, int(retry_after)))})
        super().__init__(message, **kwargs)


class BadGateway(PMSError):
    status = 502
    default_message = "Upstream service unavailable"


class ServiceUnavailable(PMSError):
    status = 503
    default_message = "Service unavailable"


class GatewayTimeout(PMSError):
    status = 504
    default_message = "Upstream service timed out"


def error_response(status: int, message: str, errors: dict[str, str] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"message": message, "errors": errors or {}}, status_code=status, headers=headers)


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def validation_errors(exc: RequestValidationError) -> dict[str, str]:
    """Per-field reasons from FastAPI/pydantic errors, first reason per field."""
    errors: dict[str, str] = {}
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        kind = err.get("type", "")
        if kind == "json_invalid":
            errors.setdefault("body", "Malformed JSON")
            continue
        field = _field_name(loc)
        message = str(err.get("msg", "invalid"))
        if kind == "extra_forbidden":
            message = "Unknown field"
        elif kind == "missing":
            message = "Field required"
        message = message.removeprefix("Value error, ")
        errors.setdefault(field, message)
    return errors


def is_database_outage(error: BaseException) -> bool:
    """Whether a database error means "cannot reach or use the database right now" (503/UNAVAILABLE)."""
    if isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError,
                          sa_exc.DisconnectionError, psycopg.OperationalError, psycopg.InterfaceError,
                          PoolTimeout)):
        return True
    return isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated


def route_template(request: Request) -> str:
    """The route template (``/patients/{patient_id}``), never the raw path, which can carry data."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def _database_answer(request: Request, exc: Exception, *, refused_value: bool) -> JSONResponse:
    """An outage is a 503 with Retry-After, a value the database refuses a 400, anything else a 500."""
    if refused_value:
        return error_response(400, "Invalid input", {"body": "A value was refused by the database"})
    if is_database_outage(exc):
        log.warning("database unavailable: %s on %s %s", type(exc).__name__, request.method, route_template(request))
        return error_response(503, "Database unavailable, try again shortly", headers={"Retry-After": "1"})
    log.error("database error %s on %s %s", type(exc).__name__, request.method, route_template(request))
    return error_response(500, "Internal error")


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to the one shape; unknown exceptions become a bare 500.

    Database errors are answered here for every service: an outage (server down, pool exhausted)
    is a 503 with Retry-After, a value the database refuses (e.g. a NUL byte in text) a 400.
    """

    @app.exception_handler(sa_exc.DBAPIError)
    async def _database(request: Request, exc: sa_exc.DBAPIError) -> JSONResponse:
        return _database_answer(request, exc, refused_value=isinstance(exc, sa_exc.DataError))

    @app.exception_handler(psycopg.Error)
    async def _psycopg(request: Request, exc: psycopg.Error) -> JSONResponse:
        # The async hot paths (pms.db.async_pool) use psycopg directly: the same answers.
        return _database_answer(request, exc, refused_value=isinstance(exc, psycopg.DataError))

    @app.exception_handler(PoolTimeout)
    @app.exception_handler(sa_exc.TimeoutError)
    async def _pool_timeout(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database pool exhausted on %s %s", request.method, route_template(request))
        return error_response(503, "Database unavailable, try again shortly", headers={"Retry-After": "1"})

    @app.exception_handler(PMSError)
    async def _pms_error(_: Request, exc: PMSError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.errors, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = validation_errors(exc)
        message = "Malformed JSON" if errors.keys() == {"body"} and errors["body"] == "Malformed JSON" \
            else "Validation failed"
        return error_response(400, message, errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "Request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "Not found"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Log the type and route only: exception text can carry patient data.
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, route_template(request))
        return error_response(500, "Internal error")
