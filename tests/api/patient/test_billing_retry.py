"""The billing retry worker's bookkeeping on the real patients database: backoff and race with an opener."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from api.patient import seed
from api.patient import service as patient_service
from api.patient.service import backoff
from pms import db
from pms.settings import Settings
from tests.fixtures.servers import ServerSet

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def settings(servers: ServerSet) -> Settings:
    return servers.settings


@pytest.fixture
def two_pending(settings: Settings) -> Iterator[tuple[sessionmaker[Session], list[uuid.UUID]]]:
    """Two new PENDING patients (the seed opens no billing account), and a session factory."""
    db.migrate(settings, "patients")
    engine = db.make_engine(settings.database_url_for("patients"), pool_size=1)
    factory = db.session_factory(engine)
    with factory() as session:
        before = set(session.execute(text("SELECT id FROM patients")).scalars())
    seed.run(settings, patients=2, seed=int(uuid.uuid4().int % 1_000_000), show_progress=False)
    with factory() as session:
        ids = [i for i in session.execute(text("SELECT id FROM patients")).scalars() if i not in before]
    assert len(ids) == 2
    yield factory, ids
    engine.dispose()


def _billing(factory: sessionmaker[Session], patient_id: uuid.UUID) -> tuple[str, int, datetime | None]:
    with factory() as session:
        row = session.execute(text("SELECT billing_status, billing_attempts, billing_next_attempt_at FROM patients"
                                   " WHERE id = :id"), {"id": patient_id}).one()
    return row[0], row[1], row[2]


def test_each_failure_doubles_the_patients_own_backoff_up_to_the_cap(
    settings: Settings, two_pending: tuple[sessionmaker[Session], list[uuid.UUID]],
) -> None:
    factory, (first, second) = two_pending
    for failures in range(1, 9):
        started = datetime.now(UTC)
        with factory() as session:
            patient_service.billing_failed(session=session, patient_ids=[first] if failures > 3 else [first, second],
                                           settings=settings)
        status, attempts, due = _billing(factory, first)
        assert (status, attempts) == ("PENDING", failures)
        assert due is not None
        assert started + backoff(settings, failures) <= due <= datetime.now(UTC) + backoff(settings, failures)
    assert _billing(factory, second)[1] == 3  # each patient its own count
    assert backoff(settings, 8) == timedelta(seconds=settings.patient.billing_retry_max_s)


def test_a_failure_recorded_after_another_worker_opened_the_account_changes_nothing(
    settings: Settings, two_pending: tuple[sessionmaker[Session], list[uuid.UUID]],
) -> None:
    """Two replicas' retry workers: one opened the account, the other's call timed out on the same patient."""
    factory, (patient_id, _) = two_pending
    with factory() as session:
        assert patient_service.billing_opened(session=session, accounts={patient_id: (str(uuid.uuid4()), "ACTIVE")},
                                              actor="billing-retry") == 1
        patient_service.billing_failed(session=session, patient_ids=[patient_id], settings=settings)
    assert _billing(factory, patient_id) == ("ACTIVE", 0, None)
