"""The shape every FastAPI service shares: health, readiness, metrics, errors, request ids.

``create_service_app`` gives each service the same outer layer so knowing one means
knowing all; the service adds its routers.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pms.errors import error_response, install_error_handlers, route_template
from pms.settings import Settings

log = logging.getLogger("pms.access")

REQUEST_ID_HEADER = "X-Request-ID"

ReadyCheck = Callable[[], dict[str, bool]]


class BodySizeLimit:
    """Refuse bodies larger than ``max_bytes`` with 413, also when no Content-Length is sent."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(413, "Request body too large")(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await error_response(413, "Request body too large")(scope, receive, send)


class _BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` once a body without (or beyond) its Content-Length passes the limit.

    An HTTPException, so whoever is reading the body lets it through: FastAPI re-raises HTTP
    exceptions met while parsing a body (any other one becomes a 400 "error parsing the body"),
    and the app's handler answers it 413 in the one error shape.
    """

    def __init__(self) -> None:
        super().__init__(413, "Request body too large")


_REQUEST_ID_KEY = REQUEST_ID_HEADER.lower().encode("latin-1")
#: A caller's X-Request-ID that is kept (anything else is replaced by a generated one).
_REQUEST_ID_SHAPE = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")


class RequestContext:
    """Request id (``X-Request-ID``, taken or made; ``request.state.request_id``), metrics, access log.

    A plain ASGI middleware: Starlette's ``@app.middleware("http")`` (BaseHTTPMiddleware) runs
    every request through an extra task and memory streams, ~0.5 ms of CPU per request in
    the write bench's profile of the patient service and the gateway. Unhandled exceptions
    are logged and answered 500 in the one error shape (when no answer was started yet).
    """

    def __init__(self, app: ASGIApp, *, service: str, requests_total: Counter, latency: Histogram,
                 quiet_routes: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.service = service
        self.quiet_routes = quiet_routes
        self.requests_total = requests_total
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        for key, value in scope.get("headers") or ():
            if key == _REQUEST_ID_KEY:
                # The caller's id is kept only if it looks like one: it goes into every log line and the
                # audit trail, so a kilobyte of anything there would flood the logs or forge audit ids.
                if _REQUEST_ID_SHAPE.fullmatch(value):
                    request_id = value.decode("ascii")
                break
        request_id = request_id or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != _REQUEST_ID_KEY]
                headers.append((_REQUEST_ID_KEY, request_id.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except _BodyTooLarge:
            raise  # BodySizeLimit (outside) answers 413; not a failure of the service
        except Exception:
            log.exception("request failed", extra={"fields": {"service": self.service, "request_id": request_id}})
            if started:
                raise  # too late for an error answer; still counted and logged below
            await error_response(500, "Internal error")(scope, receive, send_with_id)
        finally:
            self._record(scope, request_id=request_id, status=status, elapsed=time.perf_counter() - start)

    def _record(self, scope: Scope, *, request_id: str, status: int, elapsed: float) -> None:
        route = route_template(Request(scope))
        method = scope.get("method", "")
        self.requests_total.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(elapsed)
        if route not in ("/health", "/metrics"):
            # Route template, never the raw path or query: those can carry patient data. A quiet route's
            # successful calls (other services polling it) go to DEBUG: they buried the rest of the log.
            quiet = route in self.quiet_routes and status < 400
            log.log(
                logging.DEBUG if quiet else logging.INFO,
                "request",
                extra={"fields": {
                    "service": self.service, "request_id": request_id, "method": method,
                    "route": route, "status": status, "ms": round(elapsed * 1000, 2),
                }},
            )


class ErrorBody(BaseModel):
    """The one error shape (``pms.errors``), for ``responses=`` in routers and the OpenAPI documents."""

    message: str
    errors: dict[str, str] = Field(default_factory=dict)


_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def document_validation_as_400(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace FastAPI's documented 422 by the 400 ``pms.errors`` really answers (in place; idempotent).

    Every service turns a request validation error into a 400 in the one error shape, so a 422 in
    the document would mislead generated clients and contract tests. An operation that already
    documents its own 400 keeps its description (and its schema, if it gives one).
    """
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {}) if isinstance(operation, dict) else {}
            if "422" not in responses:
                continue
            del responses["422"]
            components.setdefault("ErrorBody", ErrorBody.model_json_schema())
            answer = responses.setdefault("400", {"description": "Invalid input: per-field reasons in `errors`"})
            answer.setdefault("content", {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}})
    for name in _VALIDATION_SCHEMAS:  # HTTPValidationError first: it is what refers to ValidationError
        others = {key: value for key, value in components.items() if key != name}
        if name in components and f'"#/components/schemas/{name}"' not in json.dumps([schema["paths"], others]):
            del components[name]
    return schema


def create_service_app(
    *,
    name: str,
    settings: Settings,
    title: str,
    description: str = "",
    ready: ReadyCheck | None = None,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[Any]] | None = None,
    max_body_bytes: int = 1024 * 1024,
    version: str = "1.0.0",
    quiet_routes: frozenset[str] = frozenset(),
) -> FastAPI:
    """A FastAPI app with the platform's outer layer; the caller includes its routers.

    ``quiet_routes``: route templates whose successful requests are logged at DEBUG, not INFO.
    """
    app = FastAPI(title=title, description=description, version=version, lifespan=lifespan)
    generate_openapi = app.openapi
    app.openapi = lambda: document_validation_as_400(generate_openapi())  # type: ignore[method-assign]
    app.state.settings = settings
    app.state.service_name = name
    install_error_handlers(app)

    registry = CollectorRegistry()
    requests_total = Counter(
        "http_requests_total", "HTTP requests", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "http_request_duration_seconds", "HTTP request latency", ["method", "route"], registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )
    app.state.metrics_registry = registry

    app.add_middleware(RequestContext, service=name, requests_total=requests_total,  # type: ignore[arg-type]
                       latency=latency, quiet_routes=quiet_routes)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)  # type: ignore[arg-type]

    @app.get("/health", tags=["ops"], summary="Liveness")
    def health() -> dict[str, str]:
        """Answer while the process is alive."""
        return {"status": "UP", "service": name}

    @app.get("/ready", tags=["ops"], summary="Readiness", response_model=None)
    def ready_endpoint() -> JSONResponse:
        """Report whether the service's dependencies (database, broker, ...) are reachable."""
        checks = ready() if ready else {}
        ok = all(checks.values())
        return JSONResponse(
            {"status": "READY" if ok else "NOT_READY", "service": name, "checks": checks},
            status_code=200 if ok else 503,
        )

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_model=None)
    def metrics() -> Response:
        """Expose request counters and latencies in Prometheus text format."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
