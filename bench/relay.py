"""Outbox relay: lag from a patient's commit to its event on the broker, at a steady create load.

Creates go to the real patient service (with billing running) at a steady rate; a consumer
assigned to every partition of the event topic reads each PatientEvent and notes when it
arrives. The commit time of each create is PostgreSQL's own: the bench turns on
``track_commit_timestamp`` and reads ``pg_xact_commit_timestamp(xmin)`` of the patient's
first audit row, written in the create's transaction and never updated. The Kafka message
timestamp (the relay's produce time) splits the lag into "waiting in the outbox" and "on
the wire".

The event's ``occurred_at`` is taken when the create *starts* (before the duplicate check,
the billing call and the insert), so "occurred_at -> broker" also counts the create's own
work before its commit; it is reported as context, and it is what this bench measured (as
"commit -> broker") before the commit timestamps were used.

Baseline, same run, same broker: a bare producer (configured like the relay's) to a consumer
at the same rate -- the floor of any relay. Target (issue 9): p95 <= poll interval + 100 ms.

One create before the load proves the service takes creates at all: a service that answered
every create with an error used to give an empty sample, reported as ``nan``; now the bench
stops with the status it got.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime

import httpx
import psycopg
from confluent_kafka import Consumer, TopicPartition

from bench.harness import CURRENT, Report, Row, paced, percentile, raw_produce_consume_latency, services
from pms import process
from pms.contracts import patient_events_pb2
from pms.embedded import libpq_dsn
from pms.security import Role, encode_token
from pms.settings import Settings

RATE = 50.0
SECONDS = 20
#: Name of the one create made before the load; its event is not measured.
WARM_UP_NAME = "Relay Bench Warm-up"


def _track_commit_timestamps() -> None:
    """Turn on ``track_commit_timestamp`` (a server restart) on the bench's fresh PostgreSQL."""
    postgres = CURRENT["postgres"]
    with psycopg.connect(libpq_dsn(postgres.superuser_url()), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET track_commit_timestamp = on")
    postgres.stop()
    postgres.start()


def _commit_times() -> dict[str, float]:
    """Commit time (epoch seconds) of each patient's create, from its version-1 audit row."""
    postgres = CURRENT["postgres"]
    with psycopg.connect(libpq_dsn(postgres.superuser_url("patients"))) as conn:
        rows = conn.execute("SELECT patient_id, extract(epoch FROM pg_xact_commit_timestamp(xmin)) "
                            "FROM patient_audit WHERE version = 1").fetchall()
    return {str(patient_id): float(at) for patient_id, at in rows if at is not None}


def run(settings: Settings, report: Report) -> None:
    total = int(RATE * SECONDS)
    poll_ms = settings.patient.outbox_poll_interval_s * 1000
    _track_commit_timestamps()
    floor = raw_produce_consume_latency(settings, topic="bench-relay-raw", rate=RATE, total=total)
    # patient id -> (arrival at the consumer, produce time by the relay, occurred_at), epoch seconds
    seen: dict[str, tuple[float, float, float]] = {}
    creates: list[float] = []
    with services(settings, ["billing", "patient"]):
        topic = settings.kafka.topic
        consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "bench-relay",
                             "enable.auto.commit": False, "log_level": 3, "fetch.wait.max.ms": 10})
        process.wait_until(lambda: topic in consumer.list_topics(timeout=2).topics, timeout=30,
                           message="the relay to create the event topic")
        partitions = consumer.list_topics(topic, timeout=5).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        stop = threading.Event()
        warmed = threading.Event()

        def consume() -> None:
            while not stop.is_set():
                message = consumer.poll(0.1)
                if message is None or message.error():
                    continue
                now = time.time()
                event = patient_events_pb2.PatientEvent.FromString(message.value())
                if event.name == WARM_UP_NAME:
                    warmed.set()
                    continue
                _kind, produced_ms = message.timestamp()
                occurred = datetime.fromisoformat(event.occurred_at).timestamp()
                seen[event.patient_id] = (now, produced_ms / 1000, occurred)

        reader = threading.Thread(target=consume, daemon=True)
        reader.start()
        token = encode_token(settings, sub="bench@pms.local", role=Role.ADMIN, ttl_s=3600)
        local = threading.local()
        errors = 0
        errors_lock = threading.Lock()
        statuses: set[int] = set()

        def create(i: int) -> None:
            nonlocal errors
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=30, headers={"Authorization": f"Bearer {token}"})
            start = time.perf_counter()
            response = local.client.post(settings.patient.base_url + "/patients", json={
                "name": f"Relay Bench {i}", "email": f"relay.bench.{i}@example.org", "address": f"{i} Relay Road",
                "dateOfBirth": "1970-01-01", "registeredDate": "2024-01-01"})
            creates.append((time.perf_counter() - start) * 1000)
            if response.status_code != 201:
                with errors_lock:  # several pool threads: += is not atomic
                    errors += 1
                    statuses.add(response.status_code)

        try:
            with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
                response = client.post(settings.patient.base_url + "/patients", json={
                    "name": WARM_UP_NAME, "email": f"warm-up.{uuid.uuid4().hex[:8]}@example.org",
                    "address": "0 Relay Road", "dateOfBirth": "1970-01-01", "registeredDate": "2024-01-01"})
            if response.status_code != 201:
                raise RuntimeError(f"the patient service refused the warm-up create: HTTP {response.status_code}")
            # Its whole way, so that nothing of the start-up (the relay's first produce) is in the load's figures.
            process.wait_until(warmed.is_set, timeout=30, interval=0.05, message="the warm-up event on the broker")
            seconds = paced(create, rate=RATE, total=total)
            if errors == total:
                raise RuntimeError(f"every create failed (HTTP {sorted(statuses)}): nothing to measure")
            process.wait_until(lambda: len(seen) >= total - errors, timeout=60, interval=0.05,
                               message="every event on the broker")
        finally:
            stop.set()
            reader.join(5)
            consumer.close()
        committed = _commit_times()
    missing = [pid for pid in seen if pid not in committed]
    if missing:
        raise RuntimeError(f"{len(missing)} events without a commit time (is track_commit_timestamp on?)")
    lags = [(arrived - committed[pid]) * 1000 for pid, (arrived, _produced, _occurred) in seen.items()]
    queued = [(produced - committed[pid]) * 1000 for pid, (_arrived, produced, _occurred) in seen.items()]
    from_occurred = [(arrived - occurred) * 1000 for arrived, _produced, occurred in seen.values()]
    target = f"<= {poll_ms + 100:.0f} ms (poll {poll_ms:.0f} ms + 100)"
    note = (f"{total} creates at {total / seconds:.0f}/s, errors {errors} {sorted(statuses)};"
            " commit = pg_xact_commit_timestamp; baseline: bare produce -> consume")
    report.add(Row("relay", "commit -> broker lag p50", percentile(lags, 50), "ms",
                   baseline=percentile(floor, 50), note=note))
    report.add(Row("relay", "commit -> broker lag p95", percentile(lags, 95), "ms",
                   baseline=percentile(floor, 95), target=target, note=note))
    report.add(Row("relay", "commit -> broker lag p99", percentile(lags, 99), "ms",
                   baseline=percentile(floor, 99), note=note))
    report.add(Row("relay", "of which in the outbox (commit -> produce) p95", percentile(queued, 95), "ms",
                   note="Kafka CreateTime minus the commit time"))
    report.add(Row("relay", "occurred_at -> broker p95 (incl. the create before commit)",
                   percentile(from_occurred, 95), "ms", note="what this row measured before commit timestamps"))
    report.add(Row("relay", "create request p50 (context)", percentile(creates, 50), "ms"))
