"""Wake the outbox relay when outbox rows are committed, from inside the process that wrote them.

Why not a trigger: a ``pg_notify`` in the writing transaction makes PostgreSQL take one
cluster-wide lock at commit and hold it through the commit's WAL flush (``PreCommit_Notify``),
so every create committed one after the other, with no group commit: under 16 creates in
flight, ~0.8 backends on average waited for that lock (``pg_stat_activity``: ``Lock``/
``object``). Now the writer tells its own process's relay after the commit; a relay that does
not lead passes it on with a NOTIFY of its own, outside any writing transaction
(:meth:`api.patient.relay.OutboxRelay.wake`). Writers in other processes (``pms seed``) are
found by the relay's poll.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from api.patient.models import OutboxEvent

#: ``Session.info`` key: this transaction wrote outbox rows.
_WRITTEN = "pms.outbox_written"


def mark_outbox_written(session: Session) -> None:
    """Note that ``session``'s transaction wrote outbox rows the ORM does not see (COPY, bulk SQL)."""
    session.info[_WRITTEN] = True


def wake_after_commit(factory: sessionmaker[Session], wake: Callable[[], None]) -> None:
    """Call ``wake`` after every commit of a ``factory`` session that wrote outbox rows (never after a rollback)."""

    @event.listens_for(factory, "after_flush")
    def _flushed(session: Session, _context: Any) -> None:
        if any(isinstance(obj, OutboxEvent) for obj in session.new):
            session.info[_WRITTEN] = True

    # Both also fire for a savepoint (its RELEASE, its rollback); only the outer transaction decides:
    # a released savepoint is not committed yet, and rows flushed before a rolled-back savepoint stay.
    @event.listens_for(factory, "after_commit")
    def _committed(session: Session) -> None:
        if not session.in_nested_transaction() and session.info.pop(_WRITTEN, False):
            wake()

    @event.listens_for(factory, "after_rollback")
    def _rolled_back(session: Session) -> None:
        if not session.in_nested_transaction():
            session.info.pop(_WRITTEN, None)
