"""FastAPI dependencies of the auth service as ``Annotated`` aliases."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Request

from api.auth import service as auth_service
from api.auth.models import User
from pms.db import SessionDep
from pms.errors import Forbidden
from pms.security import (
    CurrentUser,
    Principal,
    Role,
    bearer_token,
    decode_token,
    get_app_settings,
    internal_audience,
    require_roles,
)
from pms.settings import Settings

SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def _active_user(principal: CurrentUser, session: SessionDep) -> User:
    return auth_service.get_active_user(session=session, principal=principal)


ActiveUser = Annotated[User, Depends(_active_user)]


def _admin_user(user: ActiveUser, _: Annotated[object, require_roles(Role.ADMIN)]) -> User:
    return auth_service.require_admin(user=user)


AdminUser = Annotated[User, Depends(_admin_user)]


def _valid_user(user_id: uuid.UUID, session: SessionDep, _: AdminUser) -> User:
    return auth_service.get_or_raise(session=session, user_id=user_id)


#: The user named by the path, loaded for an admin caller (404 when unknown).
ValidUser = Annotated[User, Depends(_valid_user)]


def _service_caller(request: Request) -> Principal:
    """A service token (internal audience, ADMIN role): what the gateway sends for the revocation list.

    User tokens carry the public audience and are refused here, so not even a signed-in admin
    reads the list (it names recently cut-off users).
    """
    settings = get_app_settings(request)
    principal = decode_token(settings, bearer_token(request), audience=internal_audience(settings))
    if principal.role != Role.ADMIN:
        raise Forbidden()
    return principal


#: The caller of service-only endpoints (see :func:`_service_caller`).
RevocationReader = Annotated[Principal, Depends(_service_caller)]
