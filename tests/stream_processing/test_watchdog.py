"""The pipeline's guards against a broker that goes away.

The group watchdog: a consumer stuck outside its group ends the process; a member never does.
The broker restart guard: no fetch while every broker is down, resume once the topic is back.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass

import pytest
from confluent_kafka import KafkaError, TopicPartition
from quixstreams.checkpointing.exceptions import CheckpointConsumerCommitError
from quixstreams.kafka.exceptions import KafkaConsumerException

from pms.process import wait_until
from stream_processing.app import _CommitTolerantContext, build_application, on_consumer_error
from stream_processing.consumer_health import BrokerRestartGuard, GroupWatchdog, StarvationProbe


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
    guard.SETTLE_TIMEOUT_S = 0.3
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


# -- Starvation: a member with no partition while the group's events wait --------------------------------


class Starving(Consumer):
    """A member (it keeps its id) whose starvation the test switches on and off (None: mid-rebalance)."""

    def __init__(self) -> None:
        super().__init__()
        self.starving: bool | None = False
        self.nudges = 0

    def starved(self) -> bool | None:
        return self.starving

    def nudge(self) -> None:
        self.nudges += 1

    def watchdog(self) -> GroupWatchdog:
        return GroupWatchdog(self.memberid, stall_s=60, clock=self.clock, starved=self.starved, nudge=self.nudge,
                             on_stall=lambda: self.stalls.append(self.now))


def test_a_starved_member_is_nudged_at_half_the_budget_and_ends_the_process_at_the_full_budget() -> None:
    consumer = Starving()
    watchdog = consumer.watchdog()
    consumer.starving = True
    assert watchdog.check() and consumer.nudges == 0  # starts counting
    consumer.now += 29
    assert watchdog.check() and watchdog.healthy() and consumer.nudges == 0
    consumer.now += 1
    assert watchdog.check() and not watchdog.healthy() and consumer.nudges == 1  # ask it to rejoin, once
    consumer.now += 20
    assert watchdog.check() and consumer.nudges == 1
    consumer.now += 10
    assert not watchdog.check()
    assert consumer.stalls == [1060.0] and watchdog.reason == "held no partition while the group's events waited"


def test_starvation_that_ends_resets_the_budget_and_the_nudge() -> None:
    consumer = Starving()
    watchdog = consumer.watchdog()
    for _ in range(3):
        consumer.starving = True
        assert watchdog.check()
        consumer.now += 45
        assert watchdog.check()  # nudged here
        consumer.starving = False  # the nudge worked: it holds partitions again
        consumer.now += 1
        assert watchdog.check() and watchdog.healthy()
    assert consumer.stalls == [] and consumer.nudges == 3


def test_a_starvation_probe_that_cannot_reach_the_broker_counts_as_not_starved() -> None:
    consumer = Starving()

    def unreachable() -> bool:
        raise RuntimeError("consumer closed")

    watchdog = GroupWatchdog(consumer.memberid, stall_s=60, clock=consumer.clock, starved=unreachable,
                             on_stall=lambda: consumer.stalls.append(consumer.now))
    for _ in range(5):
        consumer.now += 30
        assert watchdog.check()
    assert consumer.stalls == []


class GroupView(FetchingConsumer):
    """The group as the broker sees it: committed offsets and log ends per partition."""

    def __init__(self) -> None:
        super().__init__()
        self.assigned = []
        self.topic_exists = True
        self.commits = {0: -1001, 1: -1001, 2: -1001}  # OFFSET_INVALID: the group forgot everything
        self.ends = {0: 40, 1: 35, 2: 25}

    def committed(self, partitions: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.commits[tp.partition]) for tp in partitions]

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float = -1, cached: bool = False) -> tuple[int, int]:
        assert not cached  # no partition is assigned, so there is no cached watermark
        return 0, self.ends[tp.partition]


def test_the_probe_finds_a_member_without_partitions_whose_group_does_not_move() -> None:
    view = GroupView()
    probe = StarvationProbe("patient", lambda: view)
    assert probe() and probe()  # events wait and nothing is committed


def test_an_idle_extra_replica_is_not_starved_while_the_others_consume() -> None:
    view = GroupView()
    view.commits = {0: 10, 1: 10, 2: 10}
    probe = StarvationProbe("patient", lambda: view)
    assert probe()  # first look: events wait, nothing known yet about progress
    view.commits = {0: 20, 1: 12, 2: 10}  # the members holding partitions commit
    assert not probe()
    view.commits = dict(view.ends)  # caught up: no lag at all
    assert not probe() and not probe()


def test_the_probe_is_quiet_while_the_consumer_holds_partitions_or_the_topic_is_missing() -> None:
    view = GroupView()
    probe = StarvationProbe("patient", lambda: view)
    view.assigned = [TopicPartition("patient", 0)]
    assert not probe()
    view.assigned = []
    view.topic_exists = False  # not recreated yet: nothing to consume
    assert not probe()
    view.topic_exists = True
    view.ends = {0: 0, 1: 0, 2: 0}  # recreated, still empty
    assert not probe()


# -- A failed offset commit drops the checkpoint instead of ending the process ---------------------------


class FakeCheckpoint:
    """A checkpoint holding processed offsets whose commit fails while ``broker.fail`` says so."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def expired(self) -> bool:
        return True

    def empty(self) -> bool:
        return False

    def close(self, *, revoking: bool = False) -> None:  # pragma: no cover - never empty here
        raise AssertionError("an empty checkpoint is not expected")

    def commit(self, *, revoking: bool = False) -> None:
        self.broker.attempts += 1
        if self.broker.fail:
            raise CheckpointConsumerCommitError(KafkaError(KafkaError.UNKNOWN_MEMBER_ID, "Unknown member"))
        self.broker.committed += 1


@dataclass
class Broker:
    fail: bool = False
    attempts: int = 0
    committed: int = 0
    checkpoints: int = 0


def tolerant_context(broker: Broker, clock: Consumer) -> _CommitTolerantContext:
    class Context(_CommitTolerantContext):
        def init_checkpoint(self) -> None:
            broker.checkpoints += 1
            self._checkpoint = FakeCheckpoint(broker)  # type: ignore[assignment]

    ctx = Context(commit_interval=1.0, producer=None, consumer=None, state_manager=None,  # type: ignore[arg-type]
                  sink_manager=None, dataframe_registry=None)  # type: ignore[arg-type]
    ctx.give_up_after_s = 60.0
    ctx.clock = clock.clock
    ctx.init_checkpoint()
    return ctx


def test_a_commit_to_a_broker_that_forgot_the_group_drops_the_checkpoint_and_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker, clock = Broker(fail=True), Consumer()
    ctx = tolerant_context(broker, clock)
    ctx.commit_checkpoint()
    ctx.commit_checkpoint(force=True, revoking=True)  # also inside a rebalance callback
    assert ctx.commits_dropped == 2 and broker.checkpoints == 3  # a fresh checkpoint after each
    assert "offset commit failed" in caplog.text
    broker.fail = False
    ctx.commit_checkpoint()
    assert broker.committed == 1


def test_commits_failing_for_the_whole_budget_still_end_the_process() -> None:
    broker, clock = Broker(fail=True), Consumer()
    ctx = tolerant_context(broker, clock)
    ctx.commit_checkpoint()
    clock.now += 59
    ctx.commit_checkpoint()
    clock.now += 1
    with pytest.raises(CheckpointConsumerCommitError):
        ctx.commit_checkpoint()


def test_a_successful_commit_resets_the_failure_budget() -> None:
    broker, clock = Broker(fail=True), Consumer()
    ctx = tolerant_context(broker, clock)
    for _ in range(3):
        broker.fail = True
        ctx.commit_checkpoint()
        clock.now += 50
        ctx.commit_checkpoint()
        broker.fail = False
        ctx.commit_checkpoint()
        clock.now += 50
    assert ctx.commits_dropped == 6 and broker.committed == 3


def test_the_application_runs_on_the_tolerant_context() -> None:
    from pms.settings import Settings

    app = build_application(Settings())
    assert isinstance(app._processing_context, _CommitTolerantContext)
    assert app._processing_context.give_up_after_s == Settings().pipeline.stall_timeout_s


def test_the_consumer_fetch_wait_comes_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tansu holds a fetch for its whole wait even when events arrive, so this bounds freshness."""
    from pms.settings import Settings

    monkeypatch.delenv("PMS_PIPELINE__FETCH_WAIT_MS", raising=False)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.pipeline.fetch_wait_ms == 50  # not librdkafka's 500
    settings.pipeline.fetch_wait_ms = 70
    config = build_application(settings)._consumer._consumer_config  # Quix keeps it private
    assert config["fetch.wait.max.ms"] == 70
    assert config["session.timeout.ms"] == settings.kafka.session_timeout_ms


def paused_then_back_without_partitions(requests: list[int]) -> BrokerRestartGuard:
    """A guard that paused, then saw the broker come back: the consumer rejoined, but the topic was missing then."""
    consumer = FetchingConsumer()
    guard = guard_for(consumer)
    guard.request_rejoin = lambda: requests.append(1)
    guard.on_stats(stats("DOWN"))
    consumer.assigned = []  # the rejoin happened before the relay recreated the topic
    consumer.topic_exists = True
    consumer.member = "m-2"
    guard.on_stats(stats("UP"))
    return guard


def test_resuming_without_a_partition_in_a_settled_group_asks_for_a_new_consumer() -> None:
    """It rejoined while the topic was missing, so the group gave it nothing; a metadata refresh does not fix that."""
    requests: list[int] = []
    guard = paused_then_back_without_partitions(requests)
    wait_until(lambda: not guard.paused, timeout=10, message="fetching to resume")
    guard.group_state = ("up", "steady", 0)  # settled with nothing (set after the last statistics)
    wait_until(lambda: bool(requests), timeout=10, message="the guard to ask for a rejoin")
    assert requests == [1]


def test_no_new_consumer_is_asked_for_while_the_group_is_still_joining() -> None:
    """Closing a consumer mid-join left Tansu's group rebalancing without end."""
    requests: list[int] = []
    guard = paused_then_back_without_partitions(requests)
    wait_until(lambda: not guard.paused, timeout=10, message="fetching to resume")
    guard.group_state = ("up", "wait-join", 0)
    wait_until(lambda: not resumers(), timeout=10, message="the resumer to give up")
    assert requests == []


def resumers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pipeline-broker-restart-guard"]


def test_resuming_with_partitions_asks_for_nothing() -> None:
    consumer = FetchingConsumer()
    guard = guard_for(consumer)
    requests: list[int] = []
    guard.request_rejoin = lambda: requests.append(1)
    guard.on_stats(stats("DOWN"))
    consumer.topic_exists = True
    consumer.member = "m-2"
    guard.on_stats(stats("UP"))
    wait_until(lambda: not guard.paused, timeout=10, message="fetching to resume")
    resumers = lambda: [t for t in threading.enumerate() if t.name == "pipeline-broker-restart-guard"]  # noqa: E731
    wait_until(lambda: not resumers(), timeout=10, message="the resumer thread to end")
    assert requests == []


def test_the_probe_asks_the_broker_nothing_while_the_group_is_not_settled() -> None:
    view = GroupView()
    state: list[tuple[str, str, int] | None] = [("up", "wait-sync", 0)]
    probe = StarvationProbe("patient", lambda: view, group_state=lambda: state[0])
    assert probe() is None and view.lookups == 0  # mid-rebalance: unknown, and no request to the broker
    state[0] = ("up", "steady", 0)
    assert probe() and view.lookups == 1
    state[0] = None  # no statistics yet: look anyway
    assert probe()


def test_a_nudge_that_only_causes_a_rebalance_does_not_reset_the_budget() -> None:
    """The rejoin it asked for is a rebalance (unknown); if the member comes back starved the clock ran on."""
    consumer = Starving()
    watchdog = consumer.watchdog()
    consumer.starving = True
    assert watchdog.check()
    consumer.now += 30
    assert watchdog.check() and consumer.nudges == 1
    consumer.starving = None  # rejoining
    consumer.now += 5
    assert watchdog.check()
    consumer.starving = True  # settled again with no partition
    consumer.now += 25
    assert not watchdog.check() and consumer.stalls == [1060.0]


def test_an_unsettled_group_alone_never_counts_as_starved() -> None:
    consumer = Starving()
    watchdog = consumer.watchdog()
    consumer.starving = None
    for _ in range(10):
        consumer.now += 30
        assert watchdog.check() and watchdog.healthy()
    assert consumer.stalls == [] and consumer.nudges == 0


def test_a_missing_topic_reported_through_poll_is_not_fatal_but_other_consumer_errors_are() -> None:
    """Quix's default callback makes the process exit on any consumer error, "topic not available" included."""
    log = logging.getLogger("test")
    for code in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
        assert on_consumer_error(KafkaConsumerException(KafkaError(code)), None, log) is True
    assert on_consumer_error(KafkaConsumerException(KafkaError(KafkaError._MSG_TIMED_OUT)), None, log) is False
    assert on_consumer_error(ValueError("bad"), None, log) is False
