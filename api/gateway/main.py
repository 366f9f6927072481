"""The API gateway: ``create_app(settings)`` is what ``pms serve gateway`` runs.

The one public entry point. It checks the JWT locally on every protected call (and against
auth's revocation list, refreshed in the background: :mod:`pms.revocation`), applies the
role rules of :mod:`api.gateway.rules`, limits each caller's rate and forwards to the auth,
patient and analytics services with one pooled HTTP client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.gateway import proxy
from api.gateway.ratelimit import RateLimiter
from api.gateway.router import router
from pms import forwarding, revocation
from pms.settings import Settings
from pms.web import create_service_app

#: Sent on every response; API answers carry health data, so nothing may cache or frame them.
SECURITY_HEADERS = {
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"strict-transport-security": b"max-age=31536000; includeSubDomains",
    b"cross-origin-opener-policy": b"same-origin",
}
#: The strict policy for API answers; /docs and /redoc load Swagger/ReDoc assets and keep their own defaults.
API_CSP = b"default-src 'none'; frame-ancestors 'none'"
_DOC_PAGES = ("/docs", "/redoc")


class SecurityHeaders:
    """Add :data:`SECURITY_HEADERS` (and no-store caching, a strict CSP for API paths) to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        is_doc_page = path.startswith(_DOC_PAGES)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name not in present:
                        headers.append((name, value))
                if not is_doc_page and b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", API_CSP))
                if b"cache-control" not in present:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(settings: Settings) -> FastAPI:
    """Build the gateway app with its pooled upstream client, rate limiter, CORS and security headers."""
    gateway = settings.gateway

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        session = proxy.upstream_session(timeout=gateway.upstream_timeout_s,
                                         connect_timeout=min(gateway.upstream_timeout_s, 5.0))
        app.state.upstream_session = session
        try:
            # The same session reads auth's revocation list: one HTTP client stack in the gateway.
            async with revocation.refreshing(app, settings, session, service="gateway"):
                yield
        finally:
            await session.close()

    app = create_service_app(
        name="gateway",
        settings=settings,
        title="PMS API gateway",
        description="The one entry point: /auth/*, /api/patients/*, /api/analytics/*, /api-docs/<service>.",
        lifespan=lifespan,
        max_body_bytes=gateway.max_body_bytes,
    )
    app.state.rate_limiter = RateLimiter(gateway.rate_limit_per_minute)
    app.state.forwarding_key = forwarding.key_for(settings)  # the dashboard's signed client addresses
    app.state.upstream_errors = proxy.upstream_error_counter(app.state.metrics_registry)
    app.include_router(router)
    app.add_middleware(SecurityHeaders)  # type: ignore[arg-type]
    origins = list(dict.fromkeys([*gateway.cors_origins, settings.dashboard.base_url]))
    app.add_middleware(
        CORSMiddleware,  # type: ignore[arg-type]
        allow_origins=origins,
        allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "X-Request-ID", "If-Match", "If-None-Match",
                       "Idempotency-Key"],
        expose_headers=["X-Total-Count", "Location", "ETag", "X-Request-ID", "Retry-After"],
        allow_credentials=False,
        max_age=600,
    )
    return app
