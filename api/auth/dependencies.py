"""FastAPI dependencies of the auth service as ``Annotated`` aliases."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends

from api.auth import service as auth_service
from api.auth.models import User
from pms.db import SessionDep
from pms.security import CurrentUser, Role, get_app_settings, require_roles
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


#: A caller allowed to read the revocation list: a token with the ADMIN role (the gateway's service
#: token has no user row, so the database is not consulted; the list holds no secrets).
RevocationReader = Annotated[object, require_roles(Role.ADMIN)]
