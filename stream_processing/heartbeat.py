"""The pipeline's heartbeat in ``pipeline_status``: readers can tell a consuming pipeline from a dead one.

Every other status column moves only when a batch is written. A pipeline that died (or gave up
after its restarts, or sits outside its consumer group, or waits for a broker that is down)
therefore left its last figures looking current: lag 0, a fresh-looking p99, the dashboard's badge
green while events piled up. Each pipeline process stamps ``heartbeat_at`` every
``PMS_PIPELINE__HEARTBEAT_S``, also while no event arrives, but only while ``alive()`` says it is
consuming (see :func:`stream_processing.app.run`), and the first beat only one interval after the
start, so a process that crashes soon after each restart does not look alive. The interval goes
with the beat (``heartbeat_interval_s``): readers judge it by the writer's own setting. With several
processes the row holds the latest beat of any of them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Engine, text

log = logging.getLogger(__name__)

#: Beats a reader lets pass before it reports the pipeline as not running.
MISSED_BEATS = 3


def running(heartbeat_at: datetime | None, *, interval_s: float | None, now: datetime) -> bool:
    """Whether a pipeline that beat at ``heartbeat_at`` (every ``interval_s``) counts as running at ``now``.

    ``now`` must come from the clock that stamped the beat (the database's ``now()``).
    """
    if heartbeat_at is None or interval_s is None:
        return False
    return now - heartbeat_at <= timedelta(seconds=MISSED_BEATS * interval_s)


class Heartbeat:
    """Stamps ``pipeline_status.heartbeat_at`` every ``interval_s`` while ``alive()`` says so."""

    def __init__(self, engine: Engine, *, interval_s: float, alive: Callable[[], bool]) -> None:
        self._engine = engine
        self._interval_s = interval_s
        self._alive = alive
        self._stop = threading.Event()
        self._failing = False
        self._thread: threading.Thread | None = None

    def beat_once(self) -> bool:
        """One beat, if the pipeline is alive; True when it was written."""
        if not self._alive():
            return False
        with self._engine.begin() as conn:
            conn.execute(text("UPDATE pipeline_status SET heartbeat_at = now(), heartbeat_interval_s = :interval"
                              " WHERE id = 1"), {"interval": self._interval_s})
        return True

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self._run, name="pipeline-heartbeat", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 5.0) -> None:
        """No beat after this returns (a beat in flight is waited for)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):  # the first beat one interval after the start
            try:
                if self.beat_once() and self._failing:
                    log.info("pipeline heartbeat written again")
                    self._failing = False
            except Exception as exc:  # the database is away (the sink is stuck too, so no beat is right)
                if not self._failing:
                    log.warning("pipeline heartbeat cannot be written", extra={"fields": {"error": type(exc).__name__}})
                    self._failing = True
