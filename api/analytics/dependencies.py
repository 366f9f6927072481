"""Annotated dependencies of the analytics routes: a read-only session and the caller."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from pms.security import Principal, Role, get_app_settings, require_roles
from pms.settings import Settings


def get_session(request: Request) -> Iterator[Session]:
    """A session on the analyst role; one snapshot per request (REPEATABLE READ engine)."""
    session = request.app.state.session_factory()
    try:
        yield session
    finally:
        session.rollback()  # read-only: nothing to commit, just end the snapshot
        session.close()


def privacy_threshold(settings: Annotated[Settings, Depends(get_app_settings)]) -> int:
    return settings.analytics.privacy_threshold


SessionDep = Annotated[Session, Depends(get_session)]
#: Analysts, staff and admins may read analytics; the token is verified here, not only at the gateway.
Reader = Annotated[Principal, require_roles(Role.ANALYST, Role.STAFF, Role.ADMIN)]
Threshold = Annotated[int, Depends(privacy_threshold)]
