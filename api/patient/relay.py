"""The outbox relay: publishes committed PatientEvents to Kafka in order, and marks them sent.

One relay per database publishes at a time (a PostgreSQL advisory lock), so outbox order
is publish order. The producer is idempotent (no duplicates from its own retries) and
keyed by patient id (one patient's events stay in one partition, in version order). A
broker that is down only delays events; they stay unsent in the outbox until it answers.

The embedded broker forgets topics when it restarts. After each publish the relay stores
the topic's high watermarks; a topic that is missing, or whose watermarks went backwards,
was reset, and the relay republishes the whole outbox from the start by itself. Consumers
are idempotent by (patient_id, version), so a republish is safe.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from api.patient import repository as patient_repository
from pms.settings import Settings

log = logging.getLogger(__name__)

#: How often an idle relay checks the topic for a reset, seconds.
RESET_CHECK_INTERVAL_S = 1.0
#: Longest wait for one batch's delivery reports before the batch is retried.
FLUSH_TIMEOUT_S = 20.0


def producer_config(settings: Settings) -> dict[str, Any]:
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "message.timeout.ms": 15000,
        "socket.timeout.ms": 10000,
        "log_level": 3,
    }


def ensure_topic(admin: AdminClient, settings: Settings, *, timeout: float = 5.0) -> bool:
    """Create the event topic if it is missing; True when it had to be created.

    Lists all topics rather than asking for this one: some brokers auto-create a topic
    on a metadata request naming it, which would hide that it was gone.
    """
    topic = settings.kafka.topic
    if topic in admin.list_topics(timeout=timeout).topics:
        return False
    # Same shape as the pipeline creates it (stream_processing.app.topic_config): explicit
    # retention, because the embedded broker does not report a default and Quix needs one.
    new_topic = NewTopic(topic, num_partitions=settings.kafka.partitions, replication_factor=1,
                         config={"retention.ms": str(settings.kafka.retention_ms), "retention.bytes": "-1"})
    futures = admin.create_topics([new_topic], operation_timeout=timeout)
    try:
        futures[topic].result(timeout=timeout)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
    return True


#: pg advisory lock held by the one relay that publishes (one per patients database).
_LEADER_LOCK_ID = 7_310_100 + zlib.crc32(b"outbox") % 1_000_000


class OutboxRelay:
    """Background thread publishing the outbox (see module docstring)."""

    def __init__(self, settings: Settings, engine: Engine, factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.topic = settings.kafka.topic
        self.engine = engine
        self.factory = factory
        self.batch_size = max(1, settings.patient.outbox_batch_size)
        self.poll_interval = max(0.01, settings.patient.outbox_poll_interval_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
        self._lock_conn: Connection | None = None
        self._producer: Producer | None = None
        self._admin: AdminClient | None = None
        self._probe: Consumer | None = None
        self._last_check = 0.0
        self.published = 0
        self.resets = 0

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._close_clients()
        self._release_leadership()

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                published = self.run_once()
                if failing:
                    log.info("outbox relay publishes again", extra={"fields": {"topic": self.topic}})
                    failing = False
            except Exception as exc:  # broker or database trouble: keep the events, try again
                if not failing:  # one line per outage, not one per retry
                    log.warning("outbox relay cannot publish; events wait in the outbox",
                                extra={"fields": {"error": type(exc).__name__}})
                    failing = True
                self._close_clients()
                self._release_leadership_if_broken()
                self._last_check = 0.0  # next round: topic check first, so a down broker is not produced to
                published = 0
                self._stop.wait(min(1.0, self.poll_interval * 5))
                continue
            if published == 0:
                self._stop.wait(self.poll_interval)

    # -- one round ------------------------------------------------------------------------
    def run_once(self) -> int:
        """Publish one batch of unsent events (after a reset check when due); return how many."""
        if not self._acquire_leadership():
            return 0
        now = time.monotonic()
        if now - self._last_check >= RESET_CHECK_INTERVAL_S:
            self.check_topic()
            self._last_check = now
        with self.factory() as session:
            rows = patient_repository.unsent_events(session, limit=self.batch_size)
        if not rows:
            return 0
        delivered = self._publish(rows)
        with self.factory() as session:
            patient_repository.mark_sent(session, [row[0] for row in rows[:delivered]], sent_at=datetime.now(UTC))
            session.commit()
        if delivered:
            # Separately: a broker hiccup here must not undo the "sent" marks above.
            with self.factory() as session:
                patient_repository.save_relay_state(session, self.topic, self._watermarks())
                session.commit()
        self.published += delivered
        if delivered < len(rows):
            # Keep order: everything after the first failure is sent again, with a fresh producer.
            self._close_clients()
            raise RuntimeError(f"{len(rows) - delivered} events not delivered")
        return delivered

    def _publish(self, rows: list[tuple[int, Any, bytes]]) -> int:
        """Produce ``rows`` in order; return the length of the prefix that was delivered."""
        producer = self._get_producer()
        results: list[bool | None] = [None] * len(rows)

        def _report(index: int) -> Callable[[KafkaError | None, Message], None]:
            def _callback(err: KafkaError | None, _msg: Message) -> None:
                results[index] = err is None
            return _callback

        for index, (_id, patient_id, payload) in enumerate(rows):
            while True:
                try:
                    producer.produce(self.topic, key=str(patient_id).encode(), value=payload,
                                     on_delivery=_report(index))
                    break
                except BufferError:
                    producer.poll(0.1)
        producer.flush(FLUSH_TIMEOUT_S)
        delivered = 0
        for ok in results:
            if not ok:
                break
            delivered += 1
        return delivered

    # -- topic reset detection ------------------------------------------------------------
    def check_topic(self) -> bool:
        """Republish from the start when the topic was lost or reset; True when it was."""
        admin = self._get_admin()
        created = ensure_topic(admin, self.settings)
        with self.factory() as session:
            stored = patient_repository.relay_state(session, self.topic)
            reset = created
            if not reset:
                current = self._watermarks()
                reset = any(current.get(p, 0) < hw for p, hw in stored.items())
            if not reset and not stored:
                # Events were sent, but never to this topic as we know it (state lost or topic renamed).
                reset = patient_repository.any_sent(session)
            if not reset:
                return False
            count = patient_repository.mark_all_unsent(session)
            patient_repository.clear_relay_state(session, self.topic)
            session.commit()
        if count:
            self.resets += 1
            log.warning("event topic was reset; republishing the outbox",
                        extra={"fields": {"topic": self.topic, "events": count}})
            # A broker that lost its state has also forgotten our producer id: start afresh.
            self._close_producer()
        return count > 0

    def _watermarks(self) -> dict[int, int]:
        admin = self._get_admin()
        metadata = admin.list_topics(timeout=5)
        topic = metadata.topics.get(self.topic)
        if topic is None:
            return {}
        probe = self._get_probe()
        marks = {}
        for partition in topic.partitions:
            _low, high = probe.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=5, cached=False)
            marks[int(partition)] = int(high)
        return marks

    # -- leadership -----------------------------------------------------------------------
    def _acquire_leadership(self) -> bool:
        if self._lock_conn is not None:
            return True
        conn = self.engine.connect()
        got = conn.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": _LEADER_LOCK_ID}).scalar()
        conn.commit()
        if got:
            self._lock_conn = conn
            log.info("outbox relay is the leader", extra={"fields": {"topic": self.topic}})
            return True
        conn.close()
        return False

    def _release_leadership_if_broken(self) -> None:
        if self._lock_conn is None:
            return
        try:
            self._lock_conn.execute(text("SELECT 1"))
            self._lock_conn.commit()
        except Exception:
            self._release_leadership()

    def _release_leadership(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            with suppress(Exception):  # a dead connection released the lock already
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _LEADER_LOCK_ID})
                conn.commit()
            with suppress(Exception):
                conn.invalidate()

    # -- clients --------------------------------------------------------------------------
    def _get_producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(producer_config(self.settings))
        return self._producer

    def _get_admin(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self.settings.bootstrap_servers, "log_level": 3})
        return self._admin

    def _get_probe(self) -> Consumer:
        if self._probe is None:
            self._probe = Consumer({"bootstrap.servers": self.settings.bootstrap_servers,
                                    "group.id": "pms-patient-relay-probe", "enable.auto.commit": False,
                                    "log_level": 3})
        return self._probe

    def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.purge()
            producer.flush(0)

    def _close_clients(self) -> None:
        self._close_producer()
        probe, self._probe = self._probe, None
        if probe is not None:
            with suppress(Exception):
                probe.close()
        self._admin = None
