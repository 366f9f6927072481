"""HTTP routes of the auth service: parse, call the service, shape the response."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status

from api.auth import service as auth_service
from api.auth.dependencies import ActiveUser, AdminUser, RevocationReader, SessionDep, SettingsDep, ValidUser
from api.auth.schemas import (
    LoginRequest,
    PasswordChange,
    Revocations,
    TokenResponse,
    UserCreate,
    UserRead,
    UserUpdate,
    ValidateResponse,
)
from pms.security import CurrentUser

router = APIRouter()

_ERRORS = {
    400: {"description": "Invalid input"},
    401: {"description": "Missing, invalid or expired token"},
}
_ADMIN_ERRORS = {**_ERRORS, 403: {"description": "Not an admin"}}


@router.post("/login", response_model=TokenResponse, tags=["auth"],
             responses={401: {"description": "Bad email/password pair"}, 429: {"description": "Too many failures"}})
def login(data: LoginRequest, request: Request, session: SessionDep, settings: SettingsDep) -> TokenResponse:
    """Log in with email and password and receive a bearer token."""
    client_address = request.client.host if request.client else "unknown"
    return auth_service.login(session=session, settings=settings, data=data, client_address=client_address)


@router.get("/validate", response_model=ValidateResponse, tags=["auth"], responses=_ERRORS)
def validate(principal: CurrentUser, _: ActiveUser) -> ValidateResponse:
    """Check a bearer token (seed-compatible) and say whose it is."""
    return ValidateResponse(sub=principal.sub, role=principal.role, exp=principal.exp)


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT, tags=["auth"], responses=_ERRORS)
def logout(principal: CurrentUser, _: ActiveUser, session: SessionDep) -> Response:
    """Give up this token now (the gateway refuses it within its revocation refresh interval)."""
    auth_service.logout(session=session, principal=principal)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/revocations", response_model=Revocations, tags=["auth"],
            responses={**_ERRORS, 403: {"description": "Not an admin or service token"}})
def revocations(session: SessionDep, settings: SettingsDep, _: RevocationReader) -> Revocations:
    """Tokens to refuse besides bad signatures and expiry, for verifiers outside auth (the gateway).

    Not exposed through the gateway; the gateway calls it with a short-lived service token.
    """
    return auth_service.revocations(session=session, settings=settings)


@router.get("/me", response_model=UserRead, tags=["auth"], responses=_ERRORS)
def me(user: ActiveUser) -> UserRead:
    """Return the caller's own account."""
    return UserRead.model_validate(user)


@router.post("/me/password", status_code=status.HTTP_204_NO_CONTENT, tags=["auth"],
             responses={**_ERRORS, 429: {"description": "Too many failed logins or password checks"}})
def change_password(data: PasswordChange, user: ActiveUser, session: SessionDep, settings: SettingsDep) -> Response:
    """Change the caller's password (needs the current one; wrong ones count as failed logins)."""
    auth_service.change_password(session=session, settings=settings, user=user, data=data)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/users", response_model=list[UserRead], tags=["users"], responses=_ADMIN_ERRORS)
def list_users(
    response: Response,
    session: SessionDep,
    _: AdminUser,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[UserRead]:
    """List users, oldest first; the total is in ``X-Total-Count``."""
    users, total = auth_service.list_users(session=session, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return [UserRead.model_validate(user) for user in users]


@router.post("/users", response_model=UserRead, status_code=status.HTTP_201_CREATED, tags=["users"],
             responses={**_ADMIN_ERRORS, 409: {"description": "Email already used"}})
def create_user(data: UserCreate, response: Response, session: SessionDep, _: AdminUser) -> UserRead:
    """Create a user (ADMIN only)."""
    user = auth_service.create(session=session, data=data)
    response.headers["Location"] = f"/users/{user.id}"
    return UserRead.model_validate(user)


@router.get("/users/{user_id}", response_model=UserRead, tags=["users"],
            responses={**_ADMIN_ERRORS, 404: {"description": "Unknown user"}})
def get_user(user: ValidUser) -> UserRead:
    """Return one user (ADMIN only)."""
    return UserRead.model_validate(user)


@router.patch("/users/{user_id}", response_model=UserRead, tags=["users"],
              responses={**_ADMIN_ERRORS, 404: {"description": "Unknown user"},
                         409: {"description": "Would leave no active admin"}})
def update_user(data: UserUpdate, user: ValidUser, session: SessionDep) -> UserRead:
    """Change a user's role or active flag (ADMIN only)."""
    return UserRead.model_validate(auth_service.update(session=session, user=user, data=data))
