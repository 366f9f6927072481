"""The outbox relay: publishes committed PatientEvents to Kafka in order, and marks them sent.

One relay per database publishes at a time (a PostgreSQL advisory lock), so outbox order
is publish order. The producer is idempotent (no duplicates from its own retries) and
keyed by patient id (one patient's events stay in one partition, in version order). A
broker that is down only delays events; they stay unsent in the outbox until it answers.

The relay wakes when a transaction that wrote outbox rows commits: the writer calls
:meth:`OutboxRelay.wake` of its own process's relay after the commit (:mod:`api.patient.outbox_wake`).
The leader waits on that and, for writes in other processes, on NOTIFYs of channel
``patient_outbox`` on its advisory-lock connection; a relay that does not lead passes each
burst of its process's wake-ups on as one such NOTIFY, in a transaction of its own (a NOTIFY in
the writing transaction would serialize every commit, see :mod:`api.patient.outbox_wake`). The
poll interval stays as the fallback: a lost wake-up costs at most one poll, and a LISTEN
connection that breaks loses the lock with it, so the relay reconnects (or, while PostgreSQL is
down, retries) and reads the outbox again before it waits for the next wake-up.

The embedded broker forgets topics when it restarts. The relay stores a high watermark per
partition in ``patient_relay_state``; a topic that is missing, or whose watermarks went
below the stored ones, was reset, and the relay republishes the whole outbox from the start
by itself. Consumers are idempotent by (patient_id, version), so a republish is safe.

Which watermark is stored matters: Tansu 0.6 answers ListOffsets (an uncached
``get_watermark_offsets``) with the start of the partition's *last record batch* + 1, not
the log end. So the relay stores, from its own delivery reports, the offset of the *first*
message it delivered to the partition in a round, + 1: never above what either Tansu or
Kafka reports for that partition afterwards (every later batch starts at or after it), so
no false reset, and no broker round trip per batch. A delivery report whose offset is below
the stored watermark means the topic was reset under the relay: republish at once.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
import zlib
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

import psycopg
from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from api.patient import repository as patient_repository
from pms import db
from pms.settings import Settings

log = logging.getLogger(__name__)

#: How often the relay checks the topic for a reset (idle or busy), seconds.
RESET_CHECK_INTERVAL_S = 1.0
#: How soon a relay that is not the leader asks for the lock again, seconds.
LEADERSHIP_RETRY_S = 1.0
#: Longest wait for one batch's delivery reports before the batch is retried.
FLUSH_TIMEOUT_S = 20.0
#: The channel the leader LISTENs on, for wake-ups from relays in other processes.
NOTIFY_CHANNEL = "patient_outbox"
#: After a wake-up, wait this long before reading the outbox, so one round (a read, a
#: produce + flush and a mark statement: ~1 ms of the patient process's CPU) takes the
#: events of several creates instead of one; adds at most this much to the relay's lag.
NOTIFY_LINGER_S = 0.02
#: Longest single wait for a notification, so a stop never waits out a long poll interval.
WAIT_SLICE_S = 0.5


def _readable(fds: list[int], timeout: float) -> set[int]:
    """Which of ``fds`` become readable (or hung up) within ``timeout`` seconds.

    ``poll``, not ``select.select``, which refuses descriptors above 1023 (a busy service can hand
    one to its LISTEN connection, and the relay then lost and retook leadership in a tight loop),
    and not a selector, which needs a descriptor of its own per wait (none left: the thread died).
    """
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return {fd for fd, _events in poller.poll(timeout * 1000)}


def producer_config(settings: Settings) -> dict[str, Any]:
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,  # the relay flushes each batch at once, which sends without lingering
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


#: A relay that does not lead wakes the leader: the commit of this NOTIFY need not wait for the disk
#: (``set_config(..., true)`` lasts for the statement's own transaction).
_PASS_ON = f"SELECT set_config('synchronous_commit', 'off', true), pg_notify('{NOTIFY_CHANNEL}', '')"

#: pg advisory lock held by the one relay that publishes (one per patients database).
LEADER_LOCK_ID = 7_310_100 + zlib.crc32(b"outbox") % 1_000_000


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
        self._last_check = 0.0
        #: The stored watermarks as this leader last read or wrote them.
        self._stored: dict[int, int] = {}
        #: Set by a republish: go again at once instead of waiting for a notification.
        self._again = False
        self.published = 0
        self.resets = 0
        #: Wake-ups by a NOTIFY (another process's relay passing its commits on).
        self.notified = 0
        #: Wake-ups passed on to the leader (this relay did not lead).
        self.passed_on = 0
        # wake() writes a byte here; the relay thread waits on the other end (and its LISTEN socket).
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.wake()  # out of its wait now, not at the end of a slice
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._close_clients()
        self._release_leadership()
        if not self._thread.is_alive():  # a thread stuck past the timeout may still wait on them
            self._wake_w.close()
            self._wake_r.close()

    def wake(self) -> None:
        """Outbox rows were committed: publish them now rather than at the next poll.

        For any thread, after the commit; never blocks. A full socket buffer means wake-ups are
        pending already, and a closed one a stopped relay: both are nothing to do.
        """
        with suppress(OSError):
            self._wake_w.send(b"\0")

    def _take_wakes(self) -> None:
        """Empty the wake-up socket."""
        with suppress(OSError):  # BlockingIOError: empty
            while self._wake_r.recv(4096):
                pass

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
                self._stop.wait(min(1.0, self.poll_interval * 5))
                continue
            if published >= self.batch_size or self._again:
                self._again = False
                continue  # a full batch (more are probably waiting), or the outbox was marked unsent
            if self._lock_conn is not None:
                # Leader and listening: whatever is committed after this round's read wakes it.
                if self._wait_for_wake(self.poll_interval):
                    self._stop.wait(NOTIFY_LINGER_S)
                # Before the next read: a commit after this point wakes the next wait, one before
                # it is in the read.
                self._take_wakes()
            else:
                # Not the leader: another relay leads, or the backend that held the lock for us is still
                # going away (pg_terminate_backend is asynchronous). Ask again soon, not a whole poll later,
                # and meanwhile hand this process's commits on to the leader.
                self._pass_wakes_on(min(self.poll_interval, LEADERSHIP_RETRY_S))

    def _wait_for_wake(self, timeout: float) -> bool:
        """Wait until outbox rows are committed here or elsewhere (True) or ``timeout`` passes (False).

        A broken LISTEN connection gives up leadership (the server released the lock with
        it) and returns at once, so the next round reconnects and reads what it missed.
        """
        conn = self._lock_conn
        if conn is None:
            self._stop.wait(timeout)
            return False
        deadline = time.monotonic() + timeout
        try:
            listener = conn.connection.driver_connection
            if not isinstance(listener, psycopg.Connection):
                raise TypeError(f"LISTEN needs a psycopg connection, not {type(listener).__name__}")
            while not self._stop.is_set():
                # Also those psycopg took in with an earlier statement's answer: they are off the socket.
                # list(), not any(): take every queued notification, so each one costs at most one round.
                if list(listener.notifies(timeout=0, stop_after=1)):
                    self.notified += 1
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if self._wake_r.fileno() in _readable([self._wake_r.fileno(), listener.fileno()],
                                                      min(remaining, WAIT_SLICE_S)):
                    return True
        except Exception as exc:
            log.warning("outbox relay lost its LISTEN connection; reconnecting",
                        extra={"fields": {"error": type(exc).__name__}})
            self._release_leadership()
        return False

    def _pass_wakes_on(self, timeout: float) -> None:
        """For ``timeout`` seconds, pass this process's wake-ups on to the leading relay (not this one).

        One NOTIFY per burst (after the linger), in a transaction of its own whose commit does not
        wait for the disk: a lost notification costs the leader's poll, never an event.
        """
        deadline = time.monotonic() + timeout
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if not _readable([self._wake_r.fileno()], min(remaining, WAIT_SLICE_S)) or self._stop.is_set():
                continue
            self._stop.wait(NOTIFY_LINGER_S)
            self._take_wakes()
            try:
                with db.driver_connection(self.engine) as conn:  # one statement, its own transaction
                    conn.execute(_PASS_ON)
                self.passed_on += 1
            except Exception as exc:  # database trouble: the leader's poll (or its own restart) finds the rows
                log.debug("outbox relay could not pass a wake-up on", extra={"fields": {"error": type(exc).__name__}})

    # -- one round ------------------------------------------------------------------------
    def run_once(self) -> int:
        """Publish one batch of unsent events (after a reset check when due); return how many."""
        if not self._acquire_leadership():
            return 0
        now = time.monotonic()
        if now - self._last_check >= RESET_CHECK_INTERVAL_S:
            self.check_topic()
            self._last_check = now
        with self._session() as session:
            rows = patient_repository.unsent_events(session, limit=self.batch_size)
        if not rows:
            return 0
        delivered, firsts = self._publish(rows)
        if any(offset < self._stored.get(partition, 0) for partition, offset in firsts.items()):
            # Offsets below what this topic already had: it was reset since the last check.
            self._republish("offsets went backwards")
            self._last_check = 0.0  # and the next round checks the topic (it may need creating) first
            return delivered
        marks = {partition: offset + 1 for partition, offset in firsts.items()}
        if delivered and not firsts:
            # No offsets in the delivery reports (not seen so far): ask the broker, but never let
            # a broker hiccup here undo the sent marks (that would publish the batch twice).
            with suppress(Exception):
                marks = self._broker_watermarks()
        with self._session() as session:
            # One statement: the sent marks and the watermarks they produced, atomically.
            patient_repository.mark_sent(session, [row[0] for row in rows[:delivered]], sent_at=datetime.now(UTC),
                                         topic=self.topic, watermarks=marks)
            session.commit()
        for partition, mark in marks.items():
            self._stored[partition] = max(mark, self._stored.get(partition, 0))
        self.published += delivered
        if delivered < len(rows):
            # Keep order: everything after the first failure is sent again, with a fresh producer.
            self._close_clients()
            raise RuntimeError(f"{len(rows) - delivered} events not delivered")
        return delivered

    def _publish(self, rows: list[tuple[int, Any, bytes]]) -> tuple[int, dict[int, int]]:
        """Produce ``rows`` in order; return the length of the delivered prefix and, per
        partition, the lowest offset delivered to it within that prefix."""
        producer = self._get_producer()
        results: list[tuple[int, int] | None] = [None] * len(rows)

        def _report(index: int) -> Callable[[KafkaError | None, Message], None]:
            def _callback(err: KafkaError | None, msg: Message) -> None:
                if err is None:
                    partition, offset = msg.partition(), msg.offset()
                    results[index] = (partition if partition is not None else -1, offset if offset is not None else -1)
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
        firsts: dict[int, int] = {}
        for result in results:
            if result is None:
                break
            delivered += 1
            partition, offset = result
            if partition >= 0 and offset >= 0:
                firsts[partition] = min(offset, firsts.get(partition, offset))
        return delivered, firsts

    # -- topic reset detection ------------------------------------------------------------
    def check_topic(self) -> bool:
        """Republish from the start when the topic was lost or reset; True when it was."""
        created = ensure_topic(self._get_admin(), self.settings)
        with self._session() as session:
            stored = patient_repository.relay_state(session, self.topic)
            reason = "topic missing" if created else ""
            if not reason and stored:
                current = self._broker_watermarks()
                if any(current.get(p, 0) < hw for p, hw in stored.items()):
                    reason = "watermarks went backwards"
            if not reason and not stored and patient_repository.any_sent(session):
                # Events were sent, but never to this topic as we know it (state lost or topic renamed).
                reason = "no state for this topic"
        if not reason:
            self._stored = stored
            return False
        return self._republish(reason)

    def _republish(self, reason: str) -> bool:
        """Mark the whole outbox unsent (the next rounds publish it again); True if it had events."""
        with self.factory() as session:  # a pooled connection: a transaction, not the leader's autocommit
            count = patient_repository.mark_all_unsent(session)
            patient_repository.clear_relay_state(session, self.topic)
            session.commit()
        self._stored = {}
        self._again = True
        if count:
            self.resets += 1
            log.warning("event topic was reset; republishing the outbox",
                        extra={"fields": {"topic": self.topic, "events": count, "reason": reason}})
            # A broker that lost its state has also forgotten our producer id: start afresh.
            self._close_producer()
        return count > 0

    def _broker_watermarks(self) -> dict[int, int]:
        """High watermark per partition as the broker reports it (one ListOffsets request)."""
        admin = self._get_admin()
        topic = admin.list_topics(timeout=5).topics.get(self.topic)
        if topic is None:
            return {}
        specs = {TopicPartition(self.topic, int(p)): OffsetSpec.latest() for p in topic.partitions}
        futures = admin.list_offsets(specs, request_timeout=5)
        return {tp.partition: int(future.result(timeout=5).offset) for tp, future in futures.items()}

    # -- leadership -----------------------------------------------------------------------
    def _session(self) -> Session:
        """A session on the leader's own connection: no pool checkout (and pre-ping) per round, and
        autocommit, so a read costs no BEGIN/ROLLBACK round trips. Anything that must be atomic
        is one statement (``mark_sent``) or uses ``self.factory()``."""
        return self.factory(bind=self._lock_conn) if self._lock_conn is not None else self.factory()

    def _acquire_leadership(self) -> bool:
        if self._lock_conn is not None:
            return True
        conn = self.engine.connect()
        try:
            got = conn.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": LEADER_LOCK_ID}).scalar()
            if got:
                # Before the first read of the outbox, so no commit falls between read and LISTEN.
                conn.execute(text(f"LISTEN {NOTIFY_CHANNEL}"))
            conn.commit()
            if got:
                conn.execution_options(isolation_level="AUTOCOMMIT")  # see _session
        except Exception:
            conn.invalidate()
            raise
        if not got:
            conn.close()
            return False
        self._lock_conn = conn
        self._last_check = 0.0  # a new leader checks the topic (and loads the stored watermarks) first
        # Started now, while nothing waits: an idempotent producer's first send waits for its producer id
        # (~0.5 s on Tansu, 1 s on a busy box), which would otherwise be added to the first events' lag.
        self._get_producer()
        log.info("outbox relay is the leader", extra={"fields": {"topic": self.topic}})
        return True

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
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": LEADER_LOCK_ID})
                conn.commit()
            with suppress(Exception):
                conn.invalidate()  # never back to the pool: it LISTENs

    # -- clients --------------------------------------------------------------------------
    def _get_producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(producer_config(self.settings))
        return self._producer

    def _get_admin(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self.settings.bootstrap_servers, "log_level": 3})
        return self._admin

    def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.purge()
            producer.flush(0)

    def _close_clients(self) -> None:
        self._close_producer()
        self._admin = None
