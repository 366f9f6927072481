"""Outbox + relay on a real broker: order, no lost events, broker outage, topic loss, crash,
wake-up by a commit (passed on by a relay that does not lead; polling for other writers), a
killed LISTEN connection."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy import text

from api.patient import outbox_wake
from api.patient import relay as patient_relay
from api.patient import replay as patient_replay
from api.patient.models import OutboxEvent
from api.patient.relay import LEADER_LOCK_ID
from pms import db, process
from pms.contracts import patient_events_pb2
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


def _sql_command(settings: Settings, statement: str) -> None:
    with psycopg.connect(libpq_dsn(settings.database_url_for("patients")), autocommit=True) as conn:
        conn.execute(statement)


def _unsent(settings: Settings, patient_ids: list[str]) -> int:
    rows = _sql(settings, "SELECT count(*) FROM patient_outbox WHERE sent_at IS NULL AND patient_id = ANY(%s)",
                ([uuid.UUID(p) for p in patient_ids],))
    return int(rows[0][0])


def _with_poll(settings: Settings, seconds: float) -> Settings:
    return settings.model_copy(update={"patient": settings.patient.model_copy(
        update={"outbox_poll_interval_s": seconds})})


def _leader_pid(settings: Settings) -> int | None:
    """The backend pid of the relay holding the leader lock (its LISTEN connection), if any."""
    rows = _sql(settings, "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                          "AND classid = 0 AND objid = %s AND objsubid = 1", (LEADER_LOCK_ID,))
    return int(rows[0][0]) if rows else None


def _assert_watermarks_never_above_the_broker(settings: Settings) -> None:
    """The stored watermarks are what the next reset check compares the broker's with: one above
    the broker's answer would republish the whole outbox for nothing."""
    topic = settings.kafka.topic
    stored = dict(_sql(settings, "SELECT partition, high_watermark FROM patient_relay_state WHERE topic = %s",
                       (topic,)))
    assert stored, "the relay saved no watermarks"
    probe = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": f"t-{uuid.uuid4().hex}",
                      "log_level": 3})
    try:
        for partition, high_watermark in stored.items():
            _low, high = probe.get_watermark_offsets(TopicPartition(topic, partition), timeout=10, cached=False)
            assert 0 < high_watermark <= high, (partition, high_watermark, high)
    finally:
        probe.close()


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
    # The test holds the leader lock, so this service's relay never publishes: its events are
    # committed, then it crashes before any could go out.
    with psycopg.connect(libpq_dsn(broker_settings.database_url_for("patients")), autocommit=True) as lock:
        assert lock.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK_ID,)).fetchone() == (True,)
        svc = start_patient(broker_settings, tmp_path, name="not-leader")
        try:
            with Api(broker_settings, svc.base_url).client() as client:
                created = [client.post("/patients", json=new_patient_body(name=f"Crash Test {i}")).json()
                           for i in range(30)]
            assert _unsent(broker_settings, [p["id"] for p in created]) == 30  # committed, not published
            svc.kill()  # SIGKILL: no shutdown hooks run
        finally:
            svc.stop()
    restarted = start_patient(broker_settings, tmp_path, name="restarted")
    try:
        expected = {p["id"]: 1 for p in created}
        events = read_events(broker_settings, until=has_versions(expected), timeout=60)
        _assert_once_in_order(events, expected)
        process.wait_until(lambda: _unsent(broker_settings, list(expected)) == 0, timeout=30, message="marked sent")
        # Several events per partition went out in one batch: the watermarks taken from the
        # delivery reports must not exceed what the broker reports (Tansu: last batch start + 1).
        _assert_watermarks_never_above_the_broker(broker_settings)
    finally:
        restarted.stop()


def test_a_commit_wakes_the_relay_long_before_its_poll_and_a_killed_listen_connection_recovers(
    broker_settings: Settings, tmp_path: Path
) -> None:
    # Polling once a minute: an event within 15 s can only have come from the create's wake-up.
    lazy = _with_poll(broker_settings, 60.0)
    svc = start_patient(lazy, tmp_path, name="lazy")
    try:
        process.wait_until(lambda: _leader_pid(lazy) is not None, timeout=30, message="the relay to lead")
        with Api(lazy, svc.base_url).client() as client:
            first = client.post("/patients", json=new_patient_body()).json()
            read_events(lazy, until=has_versions({first["id"]: 1}), timeout=15)

            # Kill the relay's LISTEN (and advisory lock) connection, as a PostgreSQL restart would.
            old_pid = _leader_pid(lazy)
            assert _sql(lazy, "SELECT pg_terminate_backend(%s)", (old_pid,)) == [(True,)]
            during = client.post("/patients", json=new_patient_body()).json()
            process.wait_until(lambda: _leader_pid(lazy) not in (None, old_pid), timeout=15,
                               message="the relay to reconnect and lead again")
            after = client.post("/patients", json=new_patient_body()).json()
            expected = {first["id"]: 1, during["id"]: 1, after["id"]: 1}
            events = read_events(lazy, until=has_versions(expected), timeout=15)
        _assert_once_in_order(events, expected)
        assert "lost its LISTEN connection" in svc.log_tail(200)
    finally:
        svc.stop()


def test_rows_written_by_another_process_arrive_by_polling(
    running: tuple[ServiceProcess, Api], broker_settings: Settings
) -> None:
    _svc, api = running
    with api.client() as client:
        warm = client.post("/patients", json=new_patient_body()).json()
        read_events(broker_settings, until=has_versions({warm["id"]: 1}))
    # Written here, not by the service: nothing wakes its relay, only the poll (50 ms here) finds them.
    markers = [uuid.uuid4() for _ in range(3)]
    try:
        _insert_events(broker_settings, markers, version=1)
        events = read_events(broker_settings, until=has_versions({str(m): 1 for m in markers}), timeout=30)
        _assert_once_in_order(events, {str(m): 1 for m in markers})
    finally:
        _delete_outbox_rows(broker_settings, markers)


def test_a_relay_that_does_not_lead_passes_its_wake_ups_on_to_the_leader(broker_settings: Settings) -> None:
    # Two relays polling once a minute: an event within 15 s can only have come from the wake-up,
    # which reached the leader as a NOTIFY from the other one.
    settings = _with_poll(broker_settings, 60.0)
    db.migrate(settings, "patients")
    engine = db.make_engine(settings.database_url_for("patients"), pool_size=2, max_overflow=0)
    leader = patient_relay.OutboxRelay(settings, engine, db.session_factory(engine))
    other = patient_relay.OutboxRelay(settings, engine, db.session_factory(engine))
    warm, *markers = [uuid.uuid4() for _ in range(4)]
    try:
        leader.start()
        process.wait_until(lambda: _leader_pid(settings) is not None, timeout=30, message="a relay to lead")
        other.start()
        # The leader's own wake-up, so that its first read is over and it waits: the markers below are
        # committed after that read, and only a wake-up can bring them out before its next poll.
        _insert_events(settings, [warm], version=1)
        leader.wake()
        read_events(settings, until=has_versions({str(warm): 1}), timeout=15)
        _insert_events(settings, markers, version=1)
        other.wake()
        events = read_events(settings, until=has_versions({str(m): 1 for m in markers}), timeout=15)
        _assert_once_in_order(events, {str(m): 1 for m in markers})
        assert other.passed_on >= 1 and leader.notified >= 1
        assert other.published == 0 and leader.published >= len(markers) + 1
    finally:
        other.stop()
        leader.stop()
        engine.dispose()
        _delete_outbox_rows(settings, [warm, *markers])


def test_a_new_leader_starts_its_producer_before_there_is_anything_to_send(broker_settings: Settings) -> None:
    # An idempotent producer's first send waits ~0.5 s for its producer id: paid while idle, not by the
    # first events (it was the relay bench's p99 of ~340 ms).
    db.migrate(broker_settings, "patients")
    engine = db.make_engine(broker_settings.database_url_for("patients"), pool_size=1, max_overflow=0)
    relay = patient_relay.OutboxRelay(broker_settings, engine, db.session_factory(engine))
    try:
        assert relay._producer is None
        process.wait_until(relay._acquire_leadership, timeout=30, message="the relay to lead")
        assert relay._producer is not None
    finally:
        relay.stop()
        engine.dispose()


def test_only_a_committed_transaction_that_wrote_outbox_rows_wakes_the_relay(broker_settings: Settings) -> None:
    db.migrate(broker_settings, "patients")
    engine = db.make_engine(broker_settings.database_url_for("patients"), pool_size=1, max_overflow=0)
    factory = db.session_factory(engine)
    wakes: list[int] = []
    outbox_wake.wake_after_commit(factory, lambda: wakes.append(1))
    markers = [uuid.uuid4() for _ in range(4)]

    def stand_in(patient_id: uuid.UUID) -> OutboxEvent:
        return OutboxEvent(event_id=uuid.uuid4(), patient_id=patient_id, version=1, event_type="PATIENT_UPDATED",
                           payload=b"x", occurred_at=datetime.now(UTC))

    try:
        with factory() as session:
            session.add(stand_in(markers[0]))
            session.flush()
            session.rollback()
            assert wakes == []  # rolled back: nothing to publish
            session.execute(text("SELECT 1"))
            session.commit()
            assert wakes == []  # committed, but wrote no outbox row
            session.add_all([stand_in(markers[0]), stand_in(markers[1])])
            session.flush()
            assert wakes == []  # flushed, not yet committed
            session.commit()
            assert wakes == [1]  # one wake-up per transaction, after its commit
            outbox_wake.mark_outbox_written(session)  # as COPY does: rows the ORM never saw
            session.execute(text("SELECT 1"))
            session.commit()
            assert wakes == [1, 1]
            # Savepoints: releasing one commits nothing yet; rolling one back keeps what was flushed before.
            with session.begin_nested():
                session.add(stand_in(markers[2]))
            assert wakes == [1, 1]  # released, not committed
            session.rollback()
            session.add(stand_in(markers[3]))
            session.flush()
            savepoint = session.begin_nested()
            savepoint.rollback()
            session.commit()
            assert wakes == [1, 1, 1]  # the row flushed before the rolled-back savepoint was committed
    finally:
        engine.dispose()
        _delete_outbox_rows(broker_settings, markers)


def _delete_outbox_rows(settings: Settings, patient_ids: list[uuid.UUID]) -> None:
    """Stand-in rows for patients that exist nowhere else: keep them out of every later test's outbox."""
    _sql_command(settings, "DELETE FROM patient_outbox WHERE patient_id IN ("
                 + ", ".join(f"'{m}'" for m in patient_ids) + ")")


def _insert_events(settings: Settings, patient_ids: list[uuid.UUID], *, version: int) -> None:
    """Committed outbox rows with valid PatientEvents for patients that exist nowhere else."""
    rows = []
    for patient_id in patient_ids:
        event = patient_events_pb2.PatientEvent(event_id=str(uuid.uuid4()), patient_id=str(patient_id),
                                                version=version, occurred_at="2026-01-01T00:00:00+00:00")
        rows.append((uuid.UUID(event.event_id), patient_id, version, event.SerializeToString()))
    with psycopg.connect(libpq_dsn(settings.database_url_for("patients")), autocommit=True) as conn:
        conn.cursor().executemany(
            "INSERT INTO patient_outbox (event_id, patient_id, version, event_type, payload, occurred_at) "
            "VALUES (%s, %s, %s, 'PATIENT_UPDATED', %s, now())", rows)


def test_a_topic_recreated_between_two_checks_is_seen_in_the_delivery_reports(
    broker_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An in-process relay driven round by round (no thread, no service), so the test decides
    # when the periodic reset check may run: only on its first round.
    settings, topic = broker_settings, broker_settings.kafka.topic
    db.migrate(settings, "patients")
    engine = db.make_engine(settings.database_url_for("patients"), pool_size=2, max_overflow=0)
    relay = patient_relay.OutboxRelay(settings, engine, db.session_factory(engine))
    markers = [uuid.uuid4() for _ in range(6)]
    everything = "SELECT count(*) FROM patient_outbox"
    unsent = "SELECT count(*) FROM patient_outbox WHERE sent_at IS NULL"
    try:
        _insert_events(settings, markers, version=1)
        process.wait_until(lambda: relay.run_once() == 0 and _sql(settings, unsent)[0][0] == 0, timeout=60,
                           message="the relay to publish the outbox")
        stored = dict(_sql(settings, "SELECT partition, high_watermark FROM patient_relay_state WHERE topic = %s",
                           (topic,)))
        assert stored and all(mark > 0 for mark in stored.values())

        monkeypatch.setattr(patient_relay, "RESET_CHECK_INTERVAL_S", 3600.0)  # no check from here on
        admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers, "log_level": 3})
        admin.delete_topics([topic])[topic].result(timeout=10)
        process.wait_until(lambda: topic not in admin.list_topics(timeout=5).topics, timeout=10,
                           message="the topic to be gone")
        admin.create_topics([NewTopic(topic, num_partitions=settings.kafka.partitions,
                                      replication_factor=1)])[topic].result(timeout=10)
        # Same keys as before, so these land in partitions that have a stored watermark.
        _insert_events(settings, markers, version=2)
        resets = relay.resets
        assert relay.run_once() > 0  # delivered to the empty topic at offsets below the stored ones
        assert relay.resets == resets + 1
        assert _sql(settings, "SELECT count(*) FROM patient_relay_state WHERE topic = %s", (topic,)) == [(0,)]
        assert _sql(settings, unsent) == _sql(settings, everything)  # the whole outbox goes out again

        process.wait_until(lambda: relay.run_once() == 0 and _sql(settings, unsent)[0][0] == 0, timeout=60,
                           message="the relay to republish the outbox")
        events = read_events(settings, until=has_versions({str(m): 2 for m in markers}))
        assert {e.event.patient_id for e in events if e.event.version == 1} >= {str(m) for m in markers}
    finally:
        relay.stop()
        engine.dispose()
        _delete_outbox_rows(settings, markers)
