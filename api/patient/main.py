"""The patient service: ``create_app(settings)`` (registry target ``api.patient.main:create_app``).

On start it migrates the patients database, seeds the demo patients once (embedded mode),
and starts two background threads: the outbox relay (events -> Kafka) and the billing
retry worker (PENDING patients -> billing accounts).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import Gauge
from sqlalchemy import Engine, text

from api.patient import demo as patient_demo
from api.patient.billing_sync import BillingGateway, BillingRetryWorker
from api.patient.outbox_wake import wake_after_commit
from api.patient.relay import OutboxRelay
from api.patient.router import router
from pms import db
from pms.revocation import with_revocations
from pms.settings import Settings, get_settings
from pms.web import create_service_app

DATABASE = "patients"
#: Pooled database connections kept open (see create_app).
POOL_SIZE = 40
#: Connections of the async create path: a create holds one for a single statement at a time.
CREATE_POOL_SIZE = 16
#: Seconds a create waits for a connection of that pool before answering 503.
CREATE_POOL_TIMEOUT_S = 2.0
log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, background: bool = True) -> FastAPI:
    """Build the patient service; ``background=False`` leaves out the relay and retry threads."""
    settings = settings or get_settings()
    # As many pooled connections as the threadpool has threads (anyio's default 40): beyond
    # pool_size SQLAlchemy closes each returned connection, and a new PostgreSQL connection per
    # request (a backend fork, authentication) cost more than the create itself under load.
    engine = db.make_engine(settings.database_url_for(DATABASE), pool_size=POOL_SIZE, max_overflow=10)
    factory = db.session_factory(engine)

    # The create runs async on its own small psycopg pool (see service.create). While PostgreSQL is
    # down the pool makes a caller wait its whole timeout (it reconnects in the background), so the
    # timeout is short: a create holds a connection for one statement, a 2 s wait means an outage.
    create_pool = db.async_pool(settings.database_url_for(DATABASE), max_size=CREATE_POOL_SIZE,
                                timeout_s=CREATE_POOL_TIMEOUT_S, name="patient-create")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db.migrate(settings, DATABASE)
        workers: list[OutboxRelay | BillingRetryWorker] = []
        await create_pool.open(wait=False)
        try:
            patient_demo.seed_once(settings, factory)
            if background:
                relay = OutboxRelay(settings, engine, factory)
                app.state.relay = relay
                app.state.outbox_written = relay.wake
                workers = [relay, BillingRetryWorker(settings, factory, app.state.billing)]
                for worker in workers:
                    worker.start()
            yield
        finally:
            app.state.outbox_written = _no_relay
            for worker in reversed(workers):
                worker.stop()
            await app.state.billing.aclose()
            await create_pool.close()
            engine.dispose()

    app = create_service_app(
        name="patient",
        settings=settings,
        title="Patient service",
        description="Patient records with search, duplicates, FHIR, audit; events through an outbox.",
        ready=lambda: {"database": db.database_reachable(engine)},
        # Tokens auth has revoked are refused here too, not only at the gateway (defence in depth).
        lifespan=with_revocations("patient", settings, lifespan),
        max_body_bytes=settings.patient.max_body_bytes,
    )
    _backlog_gauges(app, engine)
    app.state.engine = engine
    app.state.session_factory = factory
    app.state.create_pool = create_pool
    # Commits that wrote outbox rows wake this process's relay (none without background threads).
    app.state.outbox_written = _no_relay
    wake_after_commit(factory, lambda: app.state.outbox_written())
    app.state.billing = BillingGateway(settings)
    app.include_router(router)
    return app


def _no_relay() -> None:
    """No relay runs in this process: its commits wait for another process's relay to poll."""


def _backlog_gauges(app: FastAPI, engine: Engine) -> None:
    """/metrics: events waiting in the outbox and patients waiting for a billing account.

    Both counts read a partial index, so a scrape stays cheap with millions of patients.
    """
    queries = {
        "patient_outbox_unsent_events": ("Outbox events not yet published",
                                         "SELECT count(*) FROM patient_outbox WHERE sent_at IS NULL"),
        "patient_billing_pending_patients": ("Active patients still without a billing account",
                                             "SELECT count(*) FROM patients "
                                             "WHERE billing_status = 'PENDING' AND deleted_at IS NULL"),
    }
    for name, (doc, sql) in queries.items():
        def _count(sql: str = sql) -> float:
            try:
                with engine.connect() as conn:
                    return float(conn.execute(text(sql)).scalar_one())
            except Exception:  # database down: report "unknown", /ready says why
                return float("nan")

        Gauge(name, doc, registry=app.state.metrics_registry).set_function(_count)
