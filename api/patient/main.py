"""The patient service: ``create_app(settings)`` (registry target ``api.patient.main:create_app``).

On start it migrates the patients database, seeds the demo patients once (embedded mode),
and starts two background threads: the outbox relay (events -> Kafka) and the billing
retry worker (PENDING patients -> billing accounts).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.patient import demo as patient_demo
from api.patient.billing_sync import BillingGateway, BillingRetryWorker
from api.patient.relay import OutboxRelay
from api.patient.router import router
from pms import db
from pms.settings import Settings, get_settings
from pms.web import create_service_app

DATABASE = "patients"


def create_app(settings: Settings | None = None, *, background: bool = True) -> FastAPI:
    """Build the patient service; ``background=False`` leaves out the relay and retry threads."""
    settings = settings or get_settings()
    engine = db.make_engine(settings.database_url_for(DATABASE))
    factory = db.session_factory(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db.migrate(settings, DATABASE)
        patient_demo.seed_once(settings, factory)
        workers: list[OutboxRelay | BillingRetryWorker] = []
        if background:
            relay = OutboxRelay(settings, engine, factory)
            app.state.relay = relay
            workers = [relay, BillingRetryWorker(settings, factory, app.state.billing)]
            for worker in workers:
                worker.start()
        try:
            yield
        finally:
            for worker in reversed(workers):
                worker.stop()
            app.state.billing.close()
            engine.dispose()

    app = create_service_app(
        name="patient",
        settings=settings,
        title="Patient service",
        description="Patient records with search, duplicates, FHIR, audit; events through an outbox.",
        ready=lambda: {"database": db.database_reachable(engine)},
        lifespan=lifespan,
        max_body_bytes=settings.patient.max_body_bytes,
    )
    app.state.engine = engine
    app.state.session_factory = factory
    app.state.billing = BillingGateway(settings)
    app.include_router(router)
    return app
