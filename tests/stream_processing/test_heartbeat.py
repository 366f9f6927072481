"""The pipeline's heartbeat: written while the pipeline is alive, not while it is stuck or dead."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from pms import db, process
from stream_processing.heartbeat import MISSED_BEATS, Heartbeat, running

pytestmark = pytest.mark.integration


def _beat(engine: Engine) -> datetime | None:
    with engine.connect() as conn:
        return conn.execute(text("SELECT heartbeat_at FROM pipeline_status WHERE id = 1")).scalar_one()


def _interval(engine: Engine) -> float | None:
    with engine.connect() as conn:
        return conn.execute(text("SELECT heartbeat_interval_s FROM pipeline_status WHERE id = 1")).scalar_one()


def test_a_beat_is_written_only_while_the_pipeline_is_alive(analytics: Engine) -> None:
    alive = False
    heartbeat = Heartbeat(analytics, interval_s=5, alive=lambda: alive)
    assert heartbeat.beat_once() is False
    assert _beat(analytics) is None
    alive = True
    assert heartbeat.beat_once() is True
    first = _beat(analytics)
    assert first is not None and abs(datetime.now(UTC) - first) < timedelta(seconds=5)
    assert _interval(analytics) == 5  # the writer's own interval goes with the beat
    alive = False  # stuck: the loop stopped turning, or the consumer left its group
    assert heartbeat.beat_once() is False
    assert _beat(analytics) == first


def test_the_beat_thread_keeps_beating_and_stops_when_asked(analytics: Engine) -> None:
    heartbeat = Heartbeat(analytics, interval_s=0.05, alive=lambda: True)
    thread = heartbeat.start()
    stopped = False
    try:
        process.wait_until(lambda: _beat(analytics) is not None, timeout=10, interval=0.02, message="first beat")
        first = _beat(analytics)
        assert first is not None
        process.wait_until(lambda: (_beat(analytics) or first) > first, timeout=10, interval=0.02,
                           message="a later beat")
        heartbeat.stop()
        stopped = True
        assert not thread.is_alive()  # stop() waits for a beat in flight: none lands after it returns
    finally:
        if not stopped:
            heartbeat.stop()


def test_the_first_beat_waits_one_interval(analytics: Engine) -> None:
    """A process that crashes soon after every restart must not look alive: no beat at start."""
    calls: list[float] = []
    heartbeat = Heartbeat(analytics, interval_s=30, alive=lambda: calls.append(1) is None)
    heartbeat.start()
    heartbeat.stop()
    assert calls == [] and _beat(analytics) is None


def test_an_exception_from_alive_costs_a_beat_not_the_thread(analytics: Engine) -> None:
    answers = iter([RuntimeError("librdkafka"), True, True, True, True, True, True, True, True, True])

    def alive() -> bool:
        answer = next(answers, True)
        if isinstance(answer, Exception):
            raise answer
        return answer

    heartbeat = Heartbeat(analytics, interval_s=0.05, alive=alive)
    heartbeat.start()
    try:
        process.wait_until(lambda: _beat(analytics) is not None, timeout=10, interval=0.02, message="a beat after")
    finally:
        heartbeat.stop()


def test_a_database_outage_costs_beats_not_the_thread(analytics: Engine) -> None:
    unreachable: URL = analytics.url.set(host="127.0.0.1", port=process.free_port(), query={})
    dead = db.make_engine(unreachable, connect_args={"connect_timeout": 1})
    heartbeat = Heartbeat(dead, interval_s=0.05, alive=lambda: True)
    thread = heartbeat.start()
    try:
        process.wait_until(lambda: heartbeat._failing, timeout=15, interval=0.02, message="the failure noticed")
        assert thread.is_alive()
    finally:
        heartbeat.stop()
        dead.dispose()


@pytest.mark.parametrize(("age_s", "expected"), [(0, True), (14.9, True), (15.1, False), (3600, False)])
def test_running_allows_three_missed_beats(age_s: float, expected: bool) -> None:
    now = datetime(2026, 11, 26, 12, tzinfo=UTC)
    assert MISSED_BEATS == 3
    assert running(now - timedelta(seconds=age_s), interval_s=5, now=now) is expected


def test_never_beaten_is_not_running() -> None:
    now = datetime.now(UTC)
    assert running(None, interval_s=5, now=now) is False
    assert running(now, interval_s=None, now=now) is False
