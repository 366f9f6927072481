"""The pipeline's guards against a broker that goes away.

The group watchdog: a consumer stuck outside its group ends the process; a member never does.
The broker restart guard: no fetch while every broker is down, resume once the topic is back.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import pytest
from confluent_kafka import TopicPartition

from pms.process import wait_until
from stream_processing.app import BrokerRestartGuard, GroupWatchdog


class Consumer:
    """A stand-in for the consumer's membership, and the clock, driven by the test."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.member: str | None = "m-1"
        self.stalls: list[float] = []

    def clock(self) -> float:
        return self.now

    def memberid(self) -> str | None:
        return self.member

    def watchdog(self) -> GroupWatchdog:
        return GroupWatchdog(self.memberid, stall_s=60, clock=self.clock,
                             on_stall=lambda: self.stalls.append(self.now))


def test_a_member_never_stalls_however_long_it_runs() -> None:
    consumer = Consumer()
    watchdog = consumer.watchdog()
    for _ in range(100):
        consumer.now += 30
        assert watchdog.check() and watchdog.healthy()
    assert consumer.stalls == []


def test_losing_membership_is_tolerated_until_the_budget_then_ends_the_process() -> None:
    consumer = Consumer()
    watchdog = consumer.watchdog()
    assert watchdog.check()
    consumer.member = None
    consumer.now += 20
    assert watchdog.check() and watchdog.healthy()  # 20 s out: a rebalance, fine
    consumer.now += 20
    assert watchdog.check() and not watchdog.healthy()  # 40 s out: /ready reports it
    consumer.now += 20
    assert not watchdog.check()  # 60 s out: exit to be restarted
    assert consumer.stalls == [1060.0]


def test_rejoining_resets_the_budget() -> None:
    consumer = Consumer()
    watchdog = consumer.watchdog()
    for member in (None, "m-2", None, "m-3"):
        consumer.member = member
        consumer.now += 45
        assert watchdog.check()
    assert consumer.stalls == []


def test_never_joining_counts_from_the_start() -> None:
    consumer = Consumer()
    consumer.member = None
    watchdog = consumer.watchdog()
    consumer.now += 59
    assert watchdog.check()
    consumer.now += 1
    assert not watchdog.check()


def test_a_client_error_counts_as_outside_the_group() -> None:
    consumer = Consumer()

    def broken() -> str | None:
        raise RuntimeError("consumer closed")

    watchdog = GroupWatchdog(broken, stall_s=60, clock=consumer.clock, on_stall=lambda: consumer.stalls.append(1))
    consumer.now += 61
    assert not watchdog.check()
    assert consumer.stalls == [1]


# -- BrokerRestartGuard: no fetch while the broker is away, resume once it has the topic again ----------


def stats(*states: str, bootstrap: str = "UP") -> str:
    """librdkafka statistics JSON with one broker per state (node ids 1..n) and a bootstrap entry."""
    brokers = {"127.0.0.1:9092/bootstrap": {"nodeid": -1, "state": bootstrap}}
    brokers |= {f"127.0.0.1:9092/{n}": {"nodeid": n, "state": s} for n, s in enumerate(states, start=1)}
    return json.dumps({"brokers": brokers})


@dataclass
class Topic:
    partitions: dict[int, object]
    error: object = None


@dataclass
class Metadata:
    topics: dict[str, Topic]


class FetchingConsumer:
    """A stand-in for the confluent-kafka consumer: assignment, pause/resume and a broker that may lack the topic."""

    def __init__(self, partitions: int = 3) -> None:
        self.assigned = [TopicPartition("patient", p) for p in range(partitions)]
        self.paused: set[tuple[str, int]] = set()
        self.topic_exists = False
        self.member = "m-1"
        self.lookups = 0
        self.group_updates = 0
        self.closed = False

    def memberid(self) -> str:
        return self.member

    def assignment(self) -> list[TopicPartition]:
        if self.closed:
            raise RuntimeError("Consumer closed")
        return list(self.assigned)

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in partitions}

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Metadata:
        self.lookups += 1
        if self.closed:
            raise RuntimeError("Consumer closed")
        if topic is None:  # all topics: librdkafka also updates the group from this answer
            self.group_updates += 1
        topics = {"billing": Topic({0: None})}
        if self.topic_exists:
            topics["patient"] = Topic({0: None, 1: None, 2: None})
        return Metadata({topic: topics[topic]} if topic in topics else {} if topic else topics)


def guard_for(consumer: FetchingConsumer, rejoin_timeout_s: float = 60.0) -> BrokerRestartGuard:
    guard = BrokerRestartGuard("patient", rejoin_timeout_s=rejoin_timeout_s)
    guard.CHECK_INTERVAL_S = 0.01
    guard.consumer = lambda: consumer
    return guard


def test_only_an_outage_of_every_broker_counts_as_down() -> None:
    down = BrokerRestartGuard.all_brokers_down
    assert down(json.loads(stats("DOWN")))
    assert down(json.loads(stats("CONNECT", "TRY_CONNECT")))
    assert not down(json.loads(stats("UP")))
    assert not down(json.loads(stats("DOWN", "UP")))  # a rolling restart of a real cluster: keep fetching
    assert not down(json.loads(stats("UP", bootstrap="DOWN")))  # the bootstrap connection is not a broker
    assert not down({"brokers": {}}) and not down({})


def test_fetching_pauses_while_the_broker_is_away_and_resumes_once_topic_and_group_are_back() -> None:
    consumer = FetchingConsumer()
    guard = guard_for(consumer)
    guard.on_stats(stats("UP"))
    assert consumer.paused == set() and not guard.paused

    guard.on_stats(stats("DOWN"))
    assert consumer.paused == {("patient", 0), ("patient", 1), ("patient", 2)}
    guard.on_stats(stats("CONNECT"))
    assert guard.pauses == 1  # one pause per outage

    guard.on_stats(stats("UP"))  # back, but empty: the topic is not there yet
    wait_until(lambda: consumer.lookups >= 3, timeout=10, message="the guard to look for the topic")
    assert consumer.paused and guard.paused

    consumer.topic_exists = True  # the outbox relay recreated it
    looked = consumer.lookups
    wait_until(lambda: consumer.lookups >= looked + 3, timeout=10, message="the guard to look again")
    assert guard.paused  # the empty broker forgot the group: a commit under member m-1 would fail

    consumer.member = "m-2"  # rejoined
    wait_until(lambda: not guard.paused, timeout=10, message="fetching to resume")
    assert consumer.paused == set()


def test_the_group_hears_of_the_topic_only_once_it_exists() -> None:
    """A group update while the topic is missing makes librdkafka report it through poll(), and Quix exits."""
    consumer = FetchingConsumer()
    guard = guard_for(consumer)
    guard.on_stats(stats("DOWN"))
    guard.on_stats(stats("UP"))
    wait_until(lambda: consumer.lookups >= 3, timeout=10, message="the guard to look for the topic")
    assert consumer.group_updates == 0
    consumer.topic_exists = True
    consumer.member = "m-2"
    wait_until(lambda: not guard.paused, timeout=10, message="fetching to resume")
    assert consumer.group_updates >= 1


def test_a_broker_that_kept_the_group_is_resumed_after_the_rejoin_timeout() -> None:
    consumer = FetchingConsumer()
    consumer.topic_exists = True
    guard = guard_for(consumer, rejoin_timeout_s=0.3)
    guard.on_stats(stats("DOWN"))
    guard.on_stats(stats("UP"))
    wait_until(lambda: not guard.paused, timeout=10, message="fetching to resume")
    assert consumer.paused == set() and consumer.member == "m-1"


def test_a_second_outage_pauses_again() -> None:
    consumer = FetchingConsumer()
    consumer.topic_exists = True
    guard = guard_for(consumer)
    for outage in (1, 2):
        guard.on_stats(stats("DOWN"))
        assert consumer.paused and guard.pauses == outage
        consumer.member = f"m-{outage + 1}"
        guard.on_stats(stats("UP"))
        wait_until(lambda: not guard.paused, timeout=10, message="fetching to resume")
        assert consumer.paused == set()


def test_every_paused_partition_is_resumed_even_if_a_rebalance_took_it_away_meanwhile() -> None:
    """librdkafka keeps an application pause across a re-assignment: one left paused would never fetch again."""
    consumer = FetchingConsumer()
    guard = guard_for(consumer)
    guard.on_stats(stats("DOWN"))
    consumer.assigned = []  # the group is rebalancing right now
    consumer.topic_exists = True
    consumer.member = "m-2"
    guard.on_stats(stats("UP"))
    wait_until(lambda: not guard.paused, timeout=10, message="fetching to resume")
    assert consumer.paused == set()


def test_nothing_to_pause_without_an_assignment_and_nothing_before_the_consumer_exists() -> None:
    consumer = FetchingConsumer(partitions=0)
    guard = guard_for(consumer)
    guard.on_stats(stats("DOWN"))
    assert not guard.paused and guard.pauses == 0
    unbound = BrokerRestartGuard("patient", rejoin_timeout_s=60)
    unbound.on_stats(stats("DOWN"))  # the Application has not created its consumer yet
    assert not unbound.paused


def test_a_closed_consumer_or_garbage_stats_do_not_raise_into_poll(caplog: pytest.LogCaptureFixture) -> None:
    consumer = FetchingConsumer()
    guard = guard_for(consumer)
    guard.on_stats("{not json")
    consumer.closed = True
    guard.on_stats(stats("DOWN"))
    assert not guard.paused
    assert [r.getMessage() for r in caplog.records] == ["broker restart guard: JSONDecodeError",
                                                       "broker restart guard: RuntimeError"]


def test_the_resumer_ends_when_the_consumer_is_closed_while_paused() -> None:
    consumer = FetchingConsumer()
    guard = guard_for(consumer)
    guard.on_stats(stats("DOWN"))
    guard.on_stats(stats("UP"))
    wait_until(lambda: consumer.lookups >= 1, timeout=10, message="the guard to look for the topic")
    consumer.closed = True
    resumers = lambda: [t for t in threading.enumerate() if t.name == "pipeline-broker-restart-guard"]  # noqa: E731
    wait_until(lambda: not resumers(), timeout=10, message="the resumer thread to end")
    assert guard.paused  # nothing resumed on a closed consumer
