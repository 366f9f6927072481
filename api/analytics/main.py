"""The analytics API: ``create_app(settings)`` (registry target ``api.analytics.main:create_app``).

Read-only: it connects as the analyst role (``settings.analyst_url()``) and answers from the
pre-aggregated tables the pipeline maintains, so it stays fast however many patients exist.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.analytics.router import router
from pms import db
from pms.revocation import with_revocations
from pms.settings import Settings
from pms.web import create_service_app


def create_app(settings: Settings) -> FastAPI:
    """Build the analytics API on the read-only analyst connection."""
    # One snapshot per request: asOf and every number of an answer come from the same commit.
    engine = db.make_engine(settings.analyst_url(), pool_size=5, max_overflow=10,
                            isolation_level="REPEATABLE READ")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            engine.dispose()

    app = create_service_app(
        name="analytics",
        # Tokens auth has revoked are refused here too, not only at the gateway (defence in depth).
        lifespan=with_revocations("analytics", settings, lifespan),
        settings=settings,
        title="Analytics API",
        description="Read-only analytics over patient events: summary, registrations, demographics, "
                    "geography, billing, freshness. Small counts are suppressed for ANALYST callers.",
        ready=lambda: {"database": db.database_reachable(engine)},
    )
    app.state.engine = engine
    app.state.session_factory = db.session_factory(engine)
    app.include_router(router)
    return app
