"""The analytics pipeline process: Quix Streams consumer -> Polars -> one Postgres transaction.

``run(settings)`` is the registry target ``stream_processing.app:run`` (``pms serve pipeline``).
It migrates the ``analytics`` database, serves ``/health``, ``/ready`` and ``/metrics`` on
``settings.pipeline.port`` (so the supervisor can probe it like any service) and consumes
topic ``settings.kafka.topic`` in consumer group ``settings.pipeline.consumer_group``.
More processes in the same group share the partitions.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from prometheus_client import Counter, Gauge
from quixstreams import Application
from quixstreams.checkpointing.exceptions import CheckpointConsumerCommitError
from quixstreams.error_callbacks import default_on_consumer_error
from quixstreams.models import TopicConfig
from quixstreams.models.serializers import Deserializer, SerializationContext
from quixstreams.processing import ProcessingContext
from sqlalchemy import Engine

from pms import db
from pms.settings import Settings
from pms.web import create_service_app
from stream_processing.sink import AnalyticsSink

log = logging.getLogger(__name__)


class PatientEventDeserializer(Deserializer):
    """Hands the protobuf ``PatientEvent`` bytes through untouched; the sink parses the batch.

    Quix runs the deserializer once per message in its one-message-at-a-time loop, where
    parsing, UUID and date checks cost more than everything else Quix does per message;
    :func:`stream_processing.transforms.parse_batch` does the same work for a whole batch
    at flush, validation and normalisation vectorised in Polars. Garbage and unknown event
    types still become dead letters there, stored in the same transaction as the good events
    of the batch, so one bad message neither stops the pipeline nor gets lost. (Quix's own
    protobuf extra is not used: it pins an older protobuf than ours.)
    """

    def __call__(self, value: bytes, ctx: SerializationContext) -> bytes:
        return value


def topic_config(settings: Settings) -> TopicConfig:
    """The topic as Quix creates it when missing; Tansu needs the retention given explicitly."""
    return TopicConfig(
        num_partitions=settings.kafka.partitions,
        replication_factor=1,
        extra_config={"retention.ms": str(settings.kafka.retention_ms), "retention.bytes": "-1"},
    )


class _CommitTolerantContext(ProcessingContext):
    """Quix's processing context, except that a failed offset commit drops the checkpoint instead of
    ending the process.

    Quix raises ``CheckpointConsumerCommitError`` out of ``Application.run()`` when the offset
    commit fails, and the process exits with code 1. After an empty broker restart that is the
    common case: a batch processed just before the broker died is committed to a broker that
    forgot the group ("Unknown member"). Dropping the checkpoint is safe here. The sinks were
    flushed first (step 1 of ``Checkpoint.commit``), so the analytics transaction has already
    committed. Offsets only ever follow that transaction, and the sink skips what it has already
    applied, so the events of the dropped checkpoint are at most redelivered and skipped.

    Failures that go on for ``give_up_after_s`` with no successful commit in between still end
    the process. The error is raised as before, so the supervisor restarts it.
    """

    #: How long commits may keep failing before the error is raised (the pipeline's stall budget).
    give_up_after_s: float = 60.0
    clock: Callable[[], float] = staticmethod(time.monotonic)
    commits_dropped: int = 0
    _failing_since: float | None = None

    def commit_checkpoint(self, force: bool = False, revoking: bool = False) -> None:
        commits = self._checkpoint is not None and (force or self.checkpoint.expired()) and not self.checkpoint.empty()
        try:
            super().commit_checkpoint(force=force, revoking=revoking)
        except CheckpointConsumerCommitError as exc:
            now = self.clock()
            self._failing_since = self._failing_since if self._failing_since is not None else now
            if now - self._failing_since >= self.give_up_after_s:
                raise
            self.commits_dropped += 1
            log.warning("offset commit failed: checkpoint dropped, its events will be redelivered and skipped",
                        extra={"fields": {"error": exc.description, "code": exc.code, "revoking": revoking}})
            self.init_checkpoint()
        else:
            if commits:
                self._failing_since = None


class _Application(Application):
    """Quix's Application, plus a deadline on shutdown and a failed offset commit that is not fatal.

    On SIGTERM Quix finishes its loop, commits and leaves the group; against a broker that
    does not answer (or while still joining) that can hang well past a supervisor's patience.
    Exiting hard after ``STOP_GRACE_S`` is safe: offsets are only ever committed after the
    analytics transaction, so anything unfinished is simply redelivered. For the same reason
    a failed offset commit only drops the checkpoint (:class:`_CommitTolerantContext`).
    """

    STOP_GRACE_S = 3.0

    def __init__(self, *args: Any, commit_failure_budget_s: float = 60.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Swapped before any StreamingDataFrame exists: app.dataframe() hands this object to them.
        old = self._processing_context
        self._processing_context = _CommitTolerantContext(
            **{f.name: getattr(old, f.name) for f in dataclasses.fields(old) if f.init})
        self._processing_context.give_up_after_s = commit_failure_budget_s
        self._rejoin_requested = False
        self.restart_guard: BrokerRestartGuard | None = None
        #: Held while the consumer is replaced and by the other threads' calls on it. Re-entrant:
        #: the SIGTERM handler takes it on the main thread, which may hold it already.
        self.client_lock = threading.RLock()
        #: Set on SIGTERM/SIGINT, under client_lock: no other thread calls the consumer after that.
        self.stopping = False
        #: How often the processing loop subscribed again on request.
        self.rejoins = 0

    @property
    def commits_dropped(self) -> int:
        return self._processing_context.commits_dropped

    def request_rejoin(self) -> None:
        """Ask the processing loop for a fresh consumer; safe from any thread (it only sets a flag).

        A consumer that joined its group while the topic was missing holds no partitions,
        and no metadata request or new subscribe call changed that in the fault runs: every
        rejoin of that librdkafka handle came back with 0 partitions, while a new process got
        them at once. So the loop closes the handle (it leaves the group) and subscribes with
        a new one, which is what a restart does, without the restart. That has to happen on the
        thread that polls, so this only sets a flag that :meth:`_process_message` reads.
        """
        self._rejoin_requested = True

    def _process_message(self, dataframe_composed: Any) -> None:
        if self._rejoin_requested:
            self._rejoin_requested = False
            self._renew_consumer()
        super()._process_message(dataframe_composed)

    def _renew_consumer(self) -> None:
        """Replace a librdkafka consumer that holds no partition by a new one in the same group.

        Only then: one with partitions is working, and one whose fetching the restart guard
        has paused is waiting for the broker. Offsets follow the analytics transaction, so a
        consumer without partitions has nothing to hand over. ``client_lock`` keeps the other
        threads (watchdog, /ready) off the handle while it is closed and replaced.
        """
        consumer = self._consumer
        guard = self.restart_guard
        with self.client_lock:
            inner = consumer._inner_consumer  # Quix creates it lazily and keeps it private
            if inner is None or inner.assignment() or (guard is not None and (guard.paused or not guard.settled())):
                return  # working, waiting for the broker, or mid-join (closing it then leaves a ghost member)
            self.rejoins += 1
            log.warning("consumer holds no partition: replacing it with a new one in the same group")
            inner.close()
            consumer._inner_consumer = None
            consumer.subscribe(
                topics=self._dataframe_registry.consumer_topics + self._topic_manager.changelog_topics_list,
                on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)

    def _arm_watchdog(self) -> None:
        def _exit() -> None:
            log.warning("pipeline did not stop within %.0fs; exiting", self.STOP_GRACE_S)
            logging.shutdown()
            os._exit(0)

        timer = threading.Timer(self.STOP_GRACE_S, _exit)
        timer.daemon = True
        timer.start()

    def _fence_other_threads(self) -> None:
        """Wait for a call in flight on another thread, then let none start: Quix is about to
        close the consumer, and a librdkafka call racing that close can crash the process."""
        with self.client_lock:
            self.stopping = True

    def _on_sigterm(self, *args: Any) -> None:
        self._arm_watchdog()
        self._fence_other_threads()
        super()._on_sigterm(*args)

    def _on_sigint(self, *args: Any) -> None:
        self._arm_watchdog()
        self._fence_other_threads()
        super()._on_sigint(*args)


def on_consumer_error(exc: Exception, message: Any, logger: logging.Logger) -> bool:
    """Quix's consumer-error callback: a topic that is missing for now is not fatal.

    After an empty broker restart the topic is gone until the outbox relay recreates it.
    librdkafka reports "Subscribed topic not available" through ``poll()`` whenever it updates
    the group in that window, and Quix's default callback makes the process exit on it. The
    topic comes back, and the restart guard and the watchdog bring the consumer back to it.
    Every other error is handled as Quix handles it.
    """
    if getattr(exc, "code", None) in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
        log.warning("subscribed topic not available yet: waiting for it", extra={"fields": {"code": exc.code}})
        return True
    return default_on_consumer_error(exc, message, logger)


def build_application(settings: Settings) -> _Application:
    """The Quix Application with the consumer settings that let groups join fast on Tansu and
    survive a broker that comes back empty (see :class:`BrokerRestartGuard`).

    ``broker_availability_timeout=0`` turns off Quix's broker probe. After an outage the probe
    sends an all-topics metadata request, which does not mark a vanished topic as gone and
    holds back the consumer's own refresh, so the consumer kept fetching the old topic id
    straight into the crash the guard prevents. GroupWatchdog (no member id for ``stall_s``,
    which librdkafka also reports after a broker outage longer than the session timeout) is
    the pipeline's stand-in for what the probe was for.
    """
    guard = BrokerRestartGuard(settings.kafka.topic, rejoin_timeout_s=settings.kafka.session_timeout_ms / 1000)
    app = _Application(
        broker_address=settings.bootstrap_servers,
        consumer_group=settings.pipeline.consumer_group,
        auto_offset_reset="earliest",
        commit_interval=settings.pipeline.batch_timeout_s,
        commit_every=settings.pipeline.batch_size,
        broker_availability_timeout=0,
        on_consumer_error=on_consumer_error,
        commit_failure_budget_s=settings.pipeline.stall_timeout_s,
        consumer_extra_config={
            "session.timeout.ms": settings.kafka.session_timeout_ms,
            "heartbeat.interval.ms": settings.kafka.heartbeat_interval_ms,
            "statistics.interval.ms": BrokerRestartGuard.STATS_INTERVAL_MS,
            "stats_cb": guard.on_stats,
        },
        consumer_poll_timeout=0.1,
        use_changelog_topics=False,
        state_dir=str(settings.data_dir / "pipeline-state"),
        loglevel="WARNING",
    )
    guard.consumer = lambda: app._consumer._consumer  # Quix keeps its confluent-kafka consumer private
    guard.request_rejoin = app.request_rejoin
    app.restart_guard = guard
    return app


class WatermarkProbe:
    """High watermarks for the lag figures, as last reported by the pipeline's own fetches.

    Fetch responses carry the partition's high watermark, so the cached value costs no
    round trip. (A ListOffsets request would be fresher, but Tansu 0.6 answers it wrongly:
    it reports the start of the last record batch + 1 instead of the log end.)
    """

    def __init__(self) -> None:
        self.application: Application | None = None

    def __call__(self, topic: str, partition: int) -> int | None:
        consumer = getattr(self.application, "_consumer", None)  # Quix keeps its consumer private
        if consumer is None:
            return None
        try:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
        except (KafkaException, RuntimeError):
            return None
        return int(high) if high is not None and high >= 0 else None


class GroupWatchdog:
    """Exit the process when the consumer has silently stopped consuming and does not come back.

    After the broker disappears and returns, librdkafka sometimes loses its group membership
    ("Unknown member") and Quix keeps polling without ever rejoining: the process looks alive
    while analytics stop. A consumer with no member id for ``stall_s`` is that state.

    The other silent state keeps a member id: the consumer rejoined while the topic was still
    missing and holds no partitions. ``starved`` (see :class:`StarvationProbe`) reports it: no
    partitions while the topic has events that nobody in the group consumes. After half the
    budget ``nudge`` is called once (``_Application.request_rejoin``: a new consumer in the
    same group, which the group gives the partitions). If the state lasts the whole budget the process exits. An idle
    extra replica (more members than partitions) is never starved, because the members that do
    hold partitions move the group's offsets.

    Exiting (code 70) lets the supervisor, compose or ECS start a fresh process. That is safe
    because offsets only follow the analytics transaction.
    """

    EXIT_CODE = 70

    def __init__(
        self,
        member_id: Callable[[], str | None],
        *,
        stall_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_stall: Callable[[], None] | None = None,
        starved: Callable[[], bool | None] | None = None,
        nudge: Callable[[], None] | None = None,
    ) -> None:
        self._member_id = member_id
        self._stall_s = stall_s
        self._clock = clock
        self._on_stall = on_stall or self._exit
        self._starved = starved
        self._nudge = nudge
        self._last_member = clock()
        self._starved_since: float | None = None
        self._nudged = False
        self.reason = ""

    def joined(self) -> bool:
        try:
            return bool(self._member_id())
        except (KafkaException, RuntimeError):
            return False

    def _look_for_starvation(self, now: float) -> None:
        try:
            starved = self._starved() if self._starved is not None else False
        except (KafkaException, RuntimeError):
            starved = False  # a broker that does not answer is the member-id check's business
        if starved is None:
            return  # mid-rebalance (e.g. the rejoin the nudge asked for): the clock keeps running
        if not starved:
            self._starved_since, self._nudged = None, False
            return
        if self._starved_since is None:
            self._starved_since = now
        if not self._nudged and self._nudge is not None and now - self._starved_since >= self._stall_s / 2:
            self._nudged = True
            log.warning("consumer holds no partition while the group's events wait: asking it to rejoin")
            try:
                self._nudge()
            except (KafkaException, RuntimeError) as exc:
                log.warning("rejoin request failed: %s", type(exc).__name__)

    def check(self) -> bool:
        """One look; returns False (after calling ``on_stall``) when the consumer is stuck."""
        now = self._clock()
        if self.joined():
            self._last_member = now
            self._look_for_starvation(now)
            if self._starved_since is None or now - self._starved_since < self._stall_s:
                return True
            self.reason = "held no partition while the group's events waited"
        elif now - self._last_member >= self._stall_s:
            self.reason = "outside its group"
        else:
            return True
        self._on_stall()
        return False

    def healthy(self) -> bool:
        """For /ready: neither outside a group nor starved for longer than half the stall budget."""
        now = self._clock()
        if self._starved_since is not None and now - self._starved_since >= self._stall_s / 2:
            return False
        return self.joined() or now - self._last_member < self._stall_s / 2

    def _exit(self) -> None:
        log.error("consumer %s for %.0fs; exiting so it is restarted", self.reason, self._stall_s)
        logging.shutdown()
        os._exit(self.EXIT_CODE)

    def start(self, interval_s: float = 2.0) -> threading.Thread:
        def loop() -> None:
            while self.check():
                time.sleep(interval_s)

        thread = threading.Thread(target=loop, name="pipeline-group-watchdog", daemon=True)
        thread.start()
        return thread


class StarvationProbe:
    """Whether the consumer holds no partition while the topic has events nobody in its group consumes.

    That is the state of a consumer that rejoined its group while the topic was missing (after
    an empty broker restart): it keeps a member id, so the member-id check cannot see it, and
    librdkafka would only notice the topic at its next metadata refresh (5 minutes). It counts
    as starved when, without partitions, the topic exists, the group's committed offsets lag
    behind the log end and they did not move since the previous look. An idle extra replica in
    a group with more members than partitions sees the others' commits move (or no lag) and is
    never starved.

    It runs on the watchdog's thread, so the blocking client calls are fine (they would abort
    the process inside a librdkafka callback). The log end comes from ListOffsets, which Tansu
    answers with the start of the last record batch + 1: a lower bound, so at worst a lag is
    missed, never invented.
    """

    TIMEOUT_S = 2.0

    def __init__(self, topic: str, consumer: Callable[[], Any],
                 group_state: Callable[[], tuple[Any, Any, Any] | None] | None = None) -> None:
        self.topic = topic
        self.consumer = consumer
        #: (state, join_state, assigned) from librdkafka's statistics, if known: only a settled
        #: member is asked about (no group or offset requests in the middle of a rebalance).
        self.group_state = group_state
        self._last: tuple[int, ...] | None = None

    def __call__(self) -> bool | None:
        """True when starved, False when not, None while the group is not settled (unknown)."""
        state = self.group_state() if self.group_state is not None else None
        if state is not None and state[1] != "steady":
            self._last = None
            return None  # joining or rebalancing: ask again once it has settled
        consumer = self.consumer()
        if consumer.assignment():
            self._last = None
            return False
        meta = consumer.list_topics(self.topic, timeout=self.TIMEOUT_S).topics.get(self.topic)
        if meta is None or meta.error is not None or not meta.partitions:
            self._last = None
            return False  # nothing to consume until the relay recreates the topic
        partitions = [TopicPartition(self.topic, p) for p in sorted(meta.partitions)]
        committed = consumer.committed(partitions, timeout=self.TIMEOUT_S)
        positions = tuple(tp.offset for tp in committed)
        lag = 0
        for tp in committed:
            low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, tp.partition),
                                                       timeout=self.TIMEOUT_S, cached=False)
            lag += max(0, high - (tp.offset if tp.offset >= 0 else low))
        moved = self._last is not None and positions != self._last
        self._last = positions
        return lag > 0 and not moved


class BrokerRestartGuard:
    """Stop fetching while every broker is down. Resume once the broker knows the topic again
    and the consumer has rejoined its group.

    This works around a SIGSEGV that is still in librdkafka 2.16 and happens when Tansu comes
    back empty:

    1. The consumer's fetch names a topic Tansu no longer has (forgotten on restart, or
       recreated under a new topic id).
    2. Tansu answers with a zero topic id, a ``CurrentLeader`` tag and an empty
       ``NodeEndpoints`` tag.
    3. librdkafka treats that as a KIP-951 leader change. Its main thread looks the topic up
       by a NULL name (``rd_kafka_metadata_update_op`` -> ``rd_kafka_metadata_cache_find``
       -> ``strcmp(NULL)``).

    librdkafka fetches its assigned partitions again as soon as it reconnects, before any
    metadata refresh. So the partitions are paused while all brokers are down. Two conditions
    have to hold before they resume:

    * A metadata request finds the topic with partitions. That request also hands
      librdkafka the new topic id.
    * The consumer holds a member id other than the one it had when paused. An empty broker
      has forgotten the group, so a batch processed under the old member would fail its
      offset commit (Unknown member), and Quix exits on a failed commit. A broker that kept
      the group (real Kafka) is given ``rejoin_timeout_s`` to show that, then resumed anyway.

    A cluster that still has a broker up (a rolling restart of real Kafka) is never paused.

    :meth:`on_stats` is librdkafka's statistics callback. confluent-kafka calls it inside
    ``poll()``, on the thread that owns the consumer, so it only pauses (a local call). The
    checks run on a helper thread: a blocking client call made inside a callback aborts the
    process (confluent-kafka asserts ``CallState_get: cs != NULL``).
    """

    #: How often librdkafka reports broker states; the outage has to be seen before the reconnect.
    STATS_INTERVAL_MS = 100
    #: Pause between two looks for the topic and the group while paused.
    CHECK_INTERVAL_S = 0.2
    #: Longest wait for the metadata answer that decides whether to resume.
    METADATA_TIMEOUT_S = 2.0
    #: Longest wait, after resuming, for the group to settle before checking the assignment.
    SETTLE_TIMEOUT_S = 30.0

    def __init__(self, topic: str, *, rejoin_timeout_s: float) -> None:
        self.topic = topic
        self.rejoin_timeout_s = rejoin_timeout_s
        #: Returns the confluent-kafka consumer; set once the Application has created it.
        self.consumer: Callable[[], Any] | None = None
        self.pauses = 0
        self._paused: list[TopicPartition] = []
        self._member_at_pause: str | None = None
        self._down = False
        self._lock = threading.Lock()
        #: (state, join_state, assignment size) of the group as librdkafka last reported it.
        self.group_state: tuple[Any, Any, Any] | None = None
        #: Called (from the guard's thread) when fetching resumes with no partition assigned.
        self.request_rejoin: Callable[[], None] | None = None

    @property
    def paused(self) -> bool:
        return bool(self._paused)

    @staticmethod
    def all_brokers_down(stats: dict[str, Any]) -> bool:
        """Whether every broker known by node id is anything but UP (bootstrap entries ignored)."""
        states = [b.get("state") for b in stats.get("brokers", {}).values() if b.get("nodeid", -1) >= 0]
        return bool(states) and all(state != "UP" for state in states)

    def on_stats(self, stats_json: str) -> None:
        if self.consumer is None:
            return
        try:
            stats = json.loads(stats_json)
            self._note_group(stats.get("cgrp") or {})
            self._down = self.all_brokers_down(stats)
            if self._down and not self._paused:
                self._pause(self.consumer())
        except (KafkaException, RuntimeError, ValueError) as exc:  # closed consumer, bad stats: next tick
            log.warning("broker restart guard: %s", type(exc).__name__)

    def _note_group(self, cgrp: dict[str, Any]) -> None:
        """Log the consumer group's state when it changes (rare: joins, rebalances, outages)."""
        state = (cgrp.get("state"), cgrp.get("join_state"), cgrp.get("assignment_size"))
        if state != self.group_state:
            self.group_state = state
            log.info("consumer group state", extra={"fields": {
                "state": state[0], "join_state": state[1], "assigned": state[2]}})

    def _pause(self, consumer: Any) -> None:
        assigned = consumer.assignment()
        if not assigned:
            return
        with self._lock:
            consumer.pause(assigned)
            self._paused = assigned
            self._member_at_pause = consumer.memberid()
            self.pauses += 1
        log.warning("every broker is down: fetching paused until the topic is back",
                    extra={"fields": {"partitions": len(assigned)}})
        threading.Thread(target=self._resume_when_back, args=(consumer,),
                         name="pipeline-broker-restart-guard", daemon=True).start()

    def topic_is_back(self, consumer: Any) -> bool:
        """Whether the broker has the topic again; if so, tell the consumer group too.

        The first request names the topic, so librdkafka takes the topic's new id from the
        answer. It does not touch the group, which matters while the topic is missing: a
        group update then reports "Subscribed topic not available" through ``poll()``, and
        Quix exits on that. Once the topic is there, one all-topics request follows, which
        librdkafka applies to the consumer group as well. That alone does not bring back a
        consumer that rejoined while the topic was missing (it holds no partitions and its
        cached subscription looks unchanged; seen in the fault suite), so after resuming
        with no partition assigned the guard calls ``request_rejoin``.
        """
        named = consumer.list_topics(self.topic, timeout=self.METADATA_TIMEOUT_S).topics.get(self.topic)
        if named is None or named.error is not None or not named.partitions:
            return False
        consumer.list_topics(timeout=self.METADATA_TIMEOUT_S)
        return True

    def _rejoined(self, consumer: Any, up_since: float) -> str | None:
        """Why the group has the consumer again, or None while it is still joining."""
        member = consumer.memberid()
        if member and member != self._member_at_pause:
            return "rejoined"
        if time.monotonic() - up_since >= self.rejoin_timeout_s:
            return "kept its membership" if member else "no member yet, rejoin timeout"
        return None

    def _resume_when_back(self, consumer: Any) -> None:
        up_since: float | None = None
        why: str | None = None
        while self._paused:
            time.sleep(self.CHECK_INTERVAL_S)
            try:
                if self._down:
                    up_since = None
                    continue
                up_since = up_since or time.monotonic()
                if not self.topic_is_back(consumer) or not (why := self._rejoined(consumer, up_since)):
                    continue  # not recreated yet (the outbox relay does that), or still joining
                with self._lock:
                    # All of them, assigned right now or not: librdkafka keeps an application
                    # pause across a rebalance, so a partition the group hands back mid-outage
                    # would otherwise stay paused for good.
                    consumer.resume(self._paused)
                    self._paused = []
            except KafkaException:
                continue  # the broker went away again mid-request: keep waiting
            except RuntimeError:
                return  # the consumer was closed: the process is stopping
        log.warning("the broker knows the topic again and the group has the consumer: fetching resumed",
                    extra={"fields": {"group": why}})
        self._rejoin_if_unassigned(consumer)

    def settled(self) -> bool:
        """Whether librdkafka last reported the group as settled (not joining or syncing)."""
        return self.group_state is not None and self.group_state[1] == "steady"

    def _rejoin_if_unassigned(self, consumer: Any) -> None:
        """Once the group has settled, ask for a new consumer if this one got no partition.

        It rejoined while the topic was missing, and the group gave it nothing. Waiting for
        the group to settle matters: a consumer closed in the middle of a join left Tansu's
        group rebalancing without end (wait-join, wait-sync, again) in a test run.
        """
        deadline = time.monotonic() + self.SETTLE_TIMEOUT_S
        try:
            while not self.settled() and time.monotonic() < deadline:
                time.sleep(self.CHECK_INTERVAL_S)
            if self.settled() and not consumer.assignment() and self.request_rejoin is not None:
                log.warning("the group settled without giving this consumer a partition: rejoin requested")
                self.request_rejoin()
        except (KafkaException, RuntimeError):
            return  # closed, or the broker went again: the watchdog's starvation check remains


def _serve_status(settings: Settings, ready: dict[str, Any], sink: AnalyticsSink, engine: Engine) -> threading.Thread:
    """Serve /health, /ready and /metrics on the pipeline's port in a background thread."""
    import uvicorn

    def checks() -> dict[str, bool]:
        watchdog = ready.get("watchdog")
        consumer_ok = bool(ready.get("running")) and (watchdog is None or watchdog.healthy())
        return {"database": db.database_reachable(engine), "consumer": consumer_ok}

    app = create_service_app(name="pipeline", settings=settings, title="PMS analytics pipeline", ready=checks)
    registry = app.state.metrics_registry
    batches = Gauge("pipeline_batches_committed", "Sink transactions committed by this process", registry=registry)
    batches.set_function(lambda: sink.batches_written)
    p99 = Gauge("pipeline_freshness_p99_ms", "Freshness p99 over the recent window", registry=registry)
    p99.set_function(lambda: sink.freshness_percentiles()[1] or 0.0)
    Counter("pipeline_starts", "Pipeline process starts", registry=registry).inc()
    config = uvicorn.Config(app, host=settings.pipeline.host, port=settings.pipeline.port, log_config=None,
                            access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="pipeline-status", daemon=True)
    thread.start()
    return thread


def run(settings: Settings) -> None:
    """Run the pipeline until SIGTERM/SIGINT (Quix stops after committing its checkpoint)."""
    faulthandler.enable()  # a crash inside librdkafka leaves a Python stack in the log
    db.migrate(settings, "analytics")
    engine = db.make_engine(settings.database_url_for("analytics"), pool_size=2, max_overflow=2)
    probe = WatermarkProbe()
    sink = AnalyticsSink(engine, freshness_window=settings.pipeline.freshness_window, watermarks=probe)
    ready: dict[str, Any] = {"running": False}
    _serve_status(settings, ready, sink, engine)

    app = build_application(settings)
    probe.application = app
    topic = app.topic(
        settings.kafka.topic,
        value_deserializer=PatientEventDeserializer(),
        key_deserializer="bytes",
        config=topic_config(settings),
    )
    app.dataframe(topic).sink(sink)
    consumer = app._consumer  # Quix keeps its consumer private; memberid() is a local librdkafka call
    consumer.memberid()  # creates the librdkafka handle here, not racing from the watchdog thread
    starvation = StarvationProbe(settings.kafka.topic, lambda: consumer._consumer,
                                 group_state=lambda: app.restart_guard.group_state)

    def member_id() -> str | None:
        with app.client_lock:  # not while the processing loop replaces the consumer, nor once stopping
            if app.stopping:
                raise RuntimeError("stopping")
            return consumer.memberid()

    def starved() -> bool | None:
        with app.client_lock:
            return None if app.stopping else starvation()

    watchdog = GroupWatchdog(member_id, stall_s=settings.pipeline.stall_timeout_s,
                             starved=starved, nudge=app.request_rejoin)
    ready["watchdog"] = watchdog
    watchdog.start()
    ready["running"] = True
    started = time.monotonic()
    log.info("pipeline starting", extra={"fields": {"topic": settings.kafka.topic,
                                                     "group": settings.pipeline.consumer_group}})
    try:
        app.run()
    finally:
        ready["running"] = False
        engine.dispose()
        log.info("pipeline stopped", extra={"fields": {"uptime_s": round(time.monotonic() - started, 1)}})
