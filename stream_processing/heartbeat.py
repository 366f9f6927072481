"""The pipeline's heartbeat in ``pipeline_status``: readers can tell a running pipeline from a dead one.

Every other status column moves only when a batch is written. A pipeline that died (or gave up
after its restarts, or sits outside its consumer group) therefore left its last figures looking
current: lag 0, a fresh-looking p99, the dashboard's badge green while events piled up in the
broker. Each pipeline process stamps ``heartbeat_at`` every ``PMS_PIPELINE__HEARTBEAT_S``, also
while no event arrives, but only while its processing loop turns and its consumer is in its
group (``alive``): a process that is up but stuck stops beating too. With several processes in
the group the column holds the latest beat of any of them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

#: Beats a reader lets pass before it reports the pipeline as not running.
MISSED_BEATS = 3


def running(heartbeat_at: datetime | None, *, now: datetime, interval_s: float) -> bool:
    """Whether a pipeline that beat at ``heartbeat_at`` counts as running at ``now``."""
    return heartbeat_at is not None and now - heartbeat_at <= timedelta(seconds=MISSED_BEATS * interval_s)


class Heartbeat:
    """Stamps ``pipeline_status.heartbeat_at`` every ``interval_s`` while ``alive()`` says so."""

    def __init__(self, engine: Engine, *, interval_s: float, alive: Callable[[], bool]) -> None:
        self._engine = engine
        self._interval_s = interval_s
        self._alive = alive
        self._stop = threading.Event()
        self._failing = False

    def beat_once(self) -> bool:
        """One beat, if the pipeline is alive; True when it was written."""
        if not self._alive():
            return False
        with self._engine.begin() as conn:
            conn.execute(text("UPDATE pipeline_status SET heartbeat_at = now() WHERE id = 1"))
        return True

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="pipeline-heartbeat", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while True:
            try:
                self.beat_once()
                if self._failing:
                    log.info("pipeline heartbeat written again")
                    self._failing = False
            except SQLAlchemyError as exc:  # the database is away: the sink is stuck too, so no beat is right
                if not self._failing:
                    log.warning("pipeline heartbeat cannot be written", extra={"fields": {"error": type(exc).__name__}})
                    self._failing = True
            if self._stop.wait(self._interval_s):
                return
