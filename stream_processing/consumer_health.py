"""Is the pipeline's consumer healthy? Probes and guards that watch librdkafka from the side.

Kept apart from :mod:`stream_processing.app` (which builds and runs the Quix application) because
each answers one question about a running consumer, with its own clock, and is unit-tested
without a broker:

- :class:`WatermarkProbe`: the partitions' high watermarks for the lag figures;
- :class:`GroupWatchdog`: exit (code 70) when the consumer stays outside its group or starved;
- :class:`StarvationProbe`: a settled member with no partition while the group's events wait;
- :class:`BrokerRestartGuard`: pause fetching while every broker is down (the librdkafka crash
  on an empty Tansu restart) and resume once the topic is back.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaException, TopicPartition
from quixstreams import Application

log = logging.getLogger(__name__)

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
