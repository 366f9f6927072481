"""Annotated dependencies of the analytics routes: a read-only session and the caller."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from psycopg import errors as pg_errors
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session

from pms import db, errors
from pms.security import Principal, Role, get_app_settings, require_roles
from pms.settings import Settings

#: Seconds a client is asked to wait while the pipeline has not created the analytics tables yet.
TABLES_MISSING_RETRY_AFTER_S = 5


class AnalyticsTablesMissing(errors.ServiceUnavailable):
    """The analytics database is reachable but the pipeline has not created its tables yet."""

    default_message = "analytics tables not created yet: is the pipeline running?"

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": str(TABLES_MISSING_RETRY_AFTER_S)})


def analytics_session(request: Request) -> Iterator[Session]:
    """A session per request (closing ends the snapshot); a missing table answers 503, not 500.

    The API may start before the pipeline has run its migrations (``pms up`` starts both, and the
    API does not own the tables). Every route reads through this session, so this is the one
    place that turns "relation does not exist" into :class:`AnalyticsTablesMissing`.
    """
    sessions = db.request_session(request)
    session = next(sessions)
    try:
        yield session
    except ProgrammingError as exc:
        if isinstance(exc.orig, pg_errors.UndefinedTable):
            raise AnalyticsTablesMissing from exc
        raise
    finally:
        sessions.close()


def privacy_threshold(settings: Annotated[Settings, Depends(get_app_settings)]) -> int:
    return settings.analytics.privacy_threshold


#: A request's read-only session (see :func:`analytics_session`).
SessionDep = Annotated[Session, Depends(analytics_session)]
#: Analysts, staff and admins may read analytics; the token is verified here, not only at the gateway.
Reader = Annotated[Principal, require_roles(Role.ANALYST, Role.STAFF, Role.ADMIN)]
Threshold = Annotated[int, Depends(privacy_threshold)]
