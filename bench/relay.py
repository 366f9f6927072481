"""Outbox relay: lag from a patient's commit to its event on the broker, at a steady create load.

Creates go to the real patient service (with billing running) at a steady rate; a consumer
assigned to every partition of the event topic reads each PatientEvent and compares the time it
arrives with the event's ``occurred_at`` (set inside the creating transaction, a few ms before
its commit, so the figure slightly over-states the lag). The Kafka message timestamp (the
relay's produce time) splits the lag into "waiting in the outbox" and "on the wire".

Baseline, same run, same broker: a bare producer (configured like the relay's) to a consumer
at the same rate -- the floor of any relay. Target (issue 9): p95 <= poll interval + 100 ms.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime

import httpx
from confluent_kafka import Consumer, TopicPartition

from bench.harness import Report, Row, paced, percentile, raw_produce_consume_latency, services
from pms import process
from pms.contracts import patient_events_pb2
from pms.security import Role, encode_token
from pms.settings import Settings

RATE = 50.0
SECONDS = 20


def run(settings: Settings, report: Report) -> None:
    total = int(RATE * SECONDS)
    poll_ms = settings.patient.outbox_poll_interval_s * 1000
    floor = raw_produce_consume_latency(settings, topic="bench-relay-raw", rate=RATE, total=total)
    with services(settings, ["billing", "patient"]):
        topic = settings.kafka.topic
        consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "bench-relay",
                             "enable.auto.commit": False, "log_level": 3, "fetch.wait.max.ms": 10})
        process.wait_until(lambda: topic in consumer.list_topics(timeout=2).topics, timeout=30,
                           message="the relay to create the event topic")
        partitions = consumer.list_topics(topic, timeout=5).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        lags: list[float] = []
        queued: list[float] = []
        stop = threading.Event()

        def consume() -> None:
            while not stop.is_set():
                message = consumer.poll(0.1)
                if message is None or message.error():
                    continue
                now = time.time()
                event = patient_events_pb2.PatientEvent.FromString(message.value())
                occurred = datetime.fromisoformat(event.occurred_at).timestamp()
                lags.append((now - occurred) * 1000)
                _kind, produced_ms = message.timestamp()
                queued.append(produced_ms - occurred * 1000)

        reader = threading.Thread(target=consume, daemon=True)
        reader.start()
        token = encode_token(settings, sub="bench@pms.local", role=Role.ADMIN, ttl_s=3600)
        local = threading.local()
        errors = 0
        statuses: set[int] = set()

        def create(i: int) -> None:
            nonlocal errors
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=30, headers={"Authorization": f"Bearer {token}"})
            response = local.client.post(settings.patient.base_url + "/patients", json={
                "name": f"Relay Bench {i}", "email": f"relay.bench.{i}@example.org", "address": f"{i} Relay Road",
                "dateOfBirth": "1970-01-01", "registeredDate": "2024-01-01"})
            if response.status_code != 201:
                errors += 1
                statuses.add(response.status_code)

        try:
            seconds = paced(create, rate=RATE, total=total)
            process.wait_until(lambda: len(lags) >= total - errors, timeout=60, interval=0.05,
                               message="every event on the broker")
        finally:
            stop.set()
            reader.join(5)
            consumer.close()
    target = f"<= {poll_ms + 100:.0f} ms (poll {poll_ms:.0f} ms + 100)"
    note = (f"{total} creates at {total / seconds:.0f}/s, errors {errors} {sorted(statuses)};"
            " baseline: bare produce -> consume")
    report.add(Row("relay", "commit -> broker lag p50", percentile(lags, 50), "ms",
                   baseline=percentile(floor, 50), note=note))
    report.add(Row("relay", "commit -> broker lag p95", percentile(lags, 95), "ms",
                   baseline=percentile(floor, 95), target=target, note=note))
    report.add(Row("relay", "commit -> broker lag p99", percentile(lags, 99), "ms",
                   baseline=percentile(floor, 99), note=note))
    report.add(Row("relay", "of which in the outbox (commit -> produce) p95", percentile(queued, 95), "ms",
                   note="Kafka CreateTime minus occurred_at"))
