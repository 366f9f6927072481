"""Annotated dependencies of the analytics routes: a read-only session and the caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from pms.db import SessionDep as SessionDep  # re-exported: a session per request (closing ends the snapshot)
from pms.security import Principal, Role, get_app_settings, require_roles
from pms.settings import Settings


def privacy_threshold(settings: Annotated[Settings, Depends(get_app_settings)]) -> int:
    return settings.analytics.privacy_threshold


#: Analysts, staff and admins may read analytics; the token is verified here, not only at the gateway.
Reader = Annotated[Principal, require_roles(Role.ANALYST, Role.STAFF, Role.ADMIN)]
Threshold = Annotated[int, Depends(privacy_threshold)]
