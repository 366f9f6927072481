"""The group watchdog: a consumer stuck outside its group ends the process; a member never does."""

from __future__ import annotations

from stream_processing.app import GroupWatchdog


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
