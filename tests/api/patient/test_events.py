"""Outbox + relay on a real broker: order, no lost events, broker outage, topic loss, crash."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from api.patient import replay as patient_replay
from pms import process
from pms.embedded import EmbeddedBroker, libpq_dsn
from pms.settings import Settings
from tests.api.patient.conftest import Api, has_versions, new_patient_body, patient_settings, read_events, start_patient
from tests.fixtures.servers import ServerSet
from tests.fixtures.services import ServiceProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def broker_settings(servers: ServerSet, private_broker: EmbeddedBroker) -> Settings:
    return patient_settings(servers, bootstrap=private_broker.bootstrap_servers)


@pytest.fixture
def running(broker_settings: Settings, tmp_path: Path) -> Iterator[tuple[ServiceProcess, Api]]:
    svc = start_patient(broker_settings, tmp_path)
    yield svc, Api(broker_settings, svc.base_url)
    svc.stop()


def _sql(settings: Settings, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(libpq_dsn(settings.database_url_for("patients"))) as conn:
        return conn.execute(query, params).fetchall()


def _unsent(settings: Settings, patient_ids: list[str]) -> int:
    rows = _sql(settings, "SELECT count(*) FROM patient_outbox WHERE sent_at IS NULL AND patient_id = ANY(%s)",
                ([uuid.UUID(p) for p in patient_ids],))
    return int(rows[0][0])


def _assert_once_in_order(events: list[Any], expected: dict[str, int]) -> None:
    by_patient: dict[str, list[int]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    for item in events:
        if item.event.patient_id in expected:
            assert item.key == item.event.patient_id
            by_patient[item.event.patient_id].append(item.event.version)
            partitions[item.event.patient_id].add(item.partition)
    for patient_id, last in expected.items():
        assert by_patient[patient_id] == list(range(1, last + 1)), patient_id  # exactly once, in order
        assert len(partitions[patient_id]) == 1


def test_every_committed_change_is_published_in_order_and_rollbacks_are_not(
    running: tuple[ServiceProcess, Api], broker_settings: Settings
) -> None:
    _svc, api = running
    with api.client() as client:
        patient = client.post("/patients", json=new_patient_body(city="Leeds", gender="other")).json()
        url = f"/patients/{patient['id']}"
        body = {k: patient[k] for k in ("name", "email", "address", "dateOfBirth")}
        assert client.put(url, json={**body, "address": "v2"}).status_code == 200
        assert client.put(url, json={**body, "address": "v3"}).status_code == 200
        assert client.delete(url).status_code == 204
        # A rolled-back change (409: email taken) must leave no event behind.
        other = client.post("/patients", json=new_patient_body()).json()
        ghost = f"Ghost {uuid.uuid4().hex[:6]}"
        assert client.post("/patients", json=new_patient_body(name=ghost, email=other["email"])).status_code == 409
        marker = client.post("/patients", json=new_patient_body()).json()
    events = read_events(broker_settings, until=has_versions({patient["id"]: 4, marker["id"]: 1}))
    _assert_once_in_order(events, {patient["id"]: 4, marker["id"]: 1})
    mine = [e.event for e in events if e.event.patient_id == patient["id"]]
    assert [e.event_type for e in mine] == [1, 2, 2, 3]  # CREATED, UPDATED, UPDATED, DELETED
    assert mine[0].city == "Leeds" and mine[0].gender == "other" and mine[0].billing_status == "PENDING"
    assert len({e.event_id for e in mine}) == 4
    assert all(e.event.name != ghost for e in events)
    assert _sql(broker_settings, "SELECT count(*) FROM patient_outbox WHERE patient_id = %s",
                (uuid.UUID(patient["id"]),))[0][0] == 4

    # Replay republishes the history (here to a fresh topic), and --from filters by date.
    replay_settings = broker_settings.model_copy(
        update={"kafka": broker_settings.kafka.model_copy(update={"topic": f"replay-{uuid.uuid4().hex[:8]}"})})
    total = _sql(broker_settings, "SELECT count(*) FROM patient_outbox")[0][0]
    assert patient_replay.run(replay_settings, show_progress=False) >= total
    replayed = read_events(replay_settings, until=has_versions({patient["id"]: 4}))
    _assert_once_in_order(replayed, {patient["id"]: 4})
    from datetime import date, timedelta

    assert patient_replay.run(replay_settings, since=date.today() + timedelta(days=1), show_progress=False) == 0


def test_broker_down_during_100_creates_then_all_arrive_once_in_order(
    running: tuple[ServiceProcess, Api], broker_settings: Settings, private_broker: EmbeddedBroker
) -> None:
    _svc, api = running
    with api.client() as client:
        warm = client.post("/patients", json=new_patient_body()).json()
        read_events(broker_settings, until=has_versions({warm["id"]: 1}))
        private_broker.stop()
        try:
            expected: dict[str, int] = {}
            for i in range(100):
                response = client.post("/patients", json=new_patient_body(name=f"Offline {i}"))
                assert response.status_code == 201, response.text
                expected[response.json()["id"]] = 1
            for patient_id in list(expected)[:20]:  # a few with more than one version
                current = client.get(f"/patients/{patient_id}").json()
                body = {k: current[k] for k in ("name", "email", "address", "dateOfBirth")}
                assert client.put(f"/patients/{patient_id}", json={**body, "address": "moved"}).status_code == 200
                expected[patient_id] = 2
            assert _unsent(broker_settings, list(expected)) == 120  # waiting in the outbox
        finally:
            # The restarted embedded broker has forgotten the topic: the relay must notice and republish.
            private_broker.start()
    events = read_events(broker_settings, until=has_versions(expected), timeout=60)
    _assert_once_in_order(events, expected)
    process.wait_until(lambda: _unsent(broker_settings, list(expected)) == 0, timeout=30, message="outbox drained")


def test_crash_between_commit_and_publish_still_publishes(broker_settings: Settings, tmp_path: Path) -> None:
    # A relay that polls once an hour: after its start-up round, nothing gets published by it.
    lazy = broker_settings.model_copy(update={"patient": broker_settings.patient.model_copy(
        update={"outbox_poll_interval_s": 3600.0})})
    svc = start_patient(lazy, tmp_path, name="lazy")
    try:
        process.wait_until(lambda: _sql(lazy, "SELECT count(*) FROM patient_outbox WHERE sent_at IS NULL")[0][0] == 0,
                           timeout=60, message="start-up round to finish")
        with Api(lazy, svc.base_url).client() as client:
            patient = client.post("/patients", json=new_patient_body(name="Crash Test")).json()
        assert _unsent(lazy, [patient["id"]]) == 1  # committed, not yet published
        svc.kill()  # SIGKILL: no shutdown hooks run
    finally:
        svc.stop()
    restarted = start_patient(broker_settings, tmp_path, name="restarted")
    try:
        events = read_events(broker_settings, until=has_versions({patient["id"]: 1}))
        _assert_once_in_order(events, {patient["id"]: 1})
        process.wait_until(lambda: _unsent(broker_settings, [patient["id"]]) == 0, timeout=30, message="marked sent")
    finally:
        restarted.stop()
