"""The shape every FastAPI service shares: health, readiness, metrics, errors, request ids.

``create_service_app`` gives each service the same outer layer so knowing one means
knowing all; the service adds its routers.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
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


class _BodyTooLarge(Exception):
    pass


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
) -> FastAPI:
    """A FastAPI app with the platform's outer layer; the caller includes its routers."""
    app = FastAPI(title=title, description=description, version=version, lifespan=lifespan)
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

    @app.middleware("http")
    async def _request_context(request: Request, call_next: Callable[[Request], Any]) -> Response:
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        request.state.request_id = request_id
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
        except Exception:
            log.exception("request failed", extra={"fields": {"service": name, "request_id": request_id}})
            response = error_response(500, "Internal error")
        elapsed = time.perf_counter() - start
        route = route_template(request)
        requests_total.labels(request.method, route, str(status)).inc()
        latency.labels(request.method, route).observe(elapsed)
        response.headers[REQUEST_ID_HEADER] = request_id
        if route not in ("/health", "/metrics"):
            # Route template, never the raw path or query: those can carry patient data.
            log.info(
                "request",
                extra={"fields": {
                    "service": name, "request_id": request_id, "method": request.method,
                    "route": route, "status": status, "ms": round(elapsed * 1000, 2),
                }},
            )
        return response

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
