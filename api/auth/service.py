"""Rules of the auth service: logins and their brute-force limits, users, the first admin.

Every function here owns its transaction (commits or rolls back); routers never commit.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.auth import repository as auth_repository
from api.auth.models import User
from api.auth.schemas import (
    LoginRequest,
    PasswordChange,
    Revocations,
    TokenResponse,
    UserCreate,
    UserCutoff,
    UserUpdate,
    check_password,
    normalize_email,
)
from pms.errors import BadRequest, Conflict, Forbidden, NotFound, TooManyRequests, Unauthorized
from pms.security import Principal, Role, encode_token, hash_password, needs_rehash, verify_password
from pms.settings import Mode, Settings, read_or_create_secret

log = logging.getLogger(__name__)

#: One message for unknown user, wrong password and inactive user: the answer never says which.
LOGIN_FAILED = "Invalid email or password"
ADMIN_PASSWORD_FILE = "admin.password"
#: Seconds added to the token lifetime when deciding which cut-offs still matter (clock skew, leeway).
REVOCATION_MARGIN_S = 60


def _account_key(session: Session, settings: Settings, email: str) -> str:
    """Failure-counter key of an account: a keyed digest (the table holds no raw addresses) of the email
    folded as the database folds it, so every spelling that finds the account shares its counter."""
    folded = auth_repository.fold_email(session, email)
    digest = hmac.new(settings.jwt.key().encode(), folded.encode(), hashlib.sha256)
    return "acct:" + digest.hexdigest()


def _address_key(client_address: str) -> str:
    return "addr:" + client_address[:100]


def _limit_for(settings: Settings, key: str) -> int:
    """Failures allowed per account, or (higher: many staff share one clinic address) per client address."""
    if key.startswith("addr:"):
        return settings.auth.max_failed_logins_per_address
    return settings.auth.max_failed_logins


def _check_not_locked(*, session: Session, settings: Settings, keys: Sequence[str], now: datetime,
                      window: timedelta) -> None:
    counts = auth_repository.count_failures(session, keys=keys, since=now - window)
    waits = [
        (oldest + window - now).total_seconds()
        for key, (count, oldest) in counts.items()
        if count >= _limit_for(settings, key)
    ]
    if waits:
        session.rollback()  # release the key locks now, not when the request's session closes
        raise TooManyRequests("Too many failed logins; try again later", retry_after=math.ceil(max(waits)))


def _guard(*, session: Session, settings: Settings, keys: Sequence[str]) -> tuple[datetime, timedelta]:
    """Lock ``keys`` and refuse when any of them is over its limit; returns (now, window) for the outcome.

    Parallel guesses at one account (or from one address) are checked one after another, so a burst
    of concurrent attempts cannot slip past the limit before failures are recorded.
    """
    now = datetime.now(UTC)
    window = timedelta(seconds=settings.auth.failed_login_window_s)
    auth_repository.lock_keys(session, keys=keys)
    _check_not_locked(session=session, settings=settings, keys=keys, now=now, window=window)
    return now, window


def _record_failure(*, session: Session, keys: Sequence[str], now: datetime, window: timedelta) -> None:
    """Count one failure against every key (dropping those that left the window) and commit."""
    auth_repository.delete_failures(session, keys=keys, before=now - window)
    auth_repository.add_failures(session, keys=keys, at=now)
    session.commit()


def login(*, session: Session, settings: Settings, data: LoginRequest, client_address: str) -> TokenResponse:
    """Exchange an email and password for a signed token.

    Raises:
        TooManyRequests: the account or the client address had ``max_failed_logins`` failures
            inside the window (checked before the password, so a locked account cannot be guessed).
        Unauthorized: any bad pair, with the same message and the same argon2 cost whether the
            user exists, the password is wrong or the user is inactive.
    """
    account_key = _account_key(session, settings, data.email)
    keys = [account_key, _address_key(client_address)]
    now, window = _guard(session=session, settings=settings, keys=keys)
    user = auth_repository.get_user_by_email(session, data.email.strip())
    password_ok = verify_password(user.password_hash if user else None, data.password)
    if user is None or not password_ok or not user.active:
        _record_failure(session=session, keys=keys, now=now, window=window)
        log.info("login failed", extra={"fields": {"event": "login_failed"}})
        raise Unauthorized(LOGIN_FAILED)
    if needs_rehash(user.password_hash):
        # Parameters changed since this hash was made: upgrade it while we hold the password.
        user.password_hash = hash_password(data.password)
    auth_repository.delete_failures(session, keys=[account_key])
    session.commit()
    log.info("login succeeded", extra={"fields": {"event": "login", "user_id": str(user.id), "role": user.role}})
    return TokenResponse(
        token=encode_token(settings, sub=user.email, role=user.role),
        expires_in=settings.jwt.ttl_s,
        role=Role(user.role),
    )


def get_active_user(*, session: Session, principal: Principal) -> User:
    """The user behind a verified token, still existing and active, and the token not revoked.

    A signature only proves the token was issued; a token issued before the user's role,
    active flag or password changed, or one given up by logout, is refused here.
    """
    user = auth_repository.get_user_by_email(session, principal.sub)
    if user is None or not user.active:
        raise Unauthorized("Invalid token")
    cutoff = user.tokens_valid_after
    if (cutoff is not None and principal.iat < cutoff.timestamp()) or (
            principal.jti and auth_repository.is_token_revoked(session, principal.jti)):
        raise Unauthorized("Token revoked; log in again")
    return user


def _revoke_sessions(user: User, *, now: datetime) -> None:
    """Refuse every token of ``user`` issued until now (the gateway learns it within its refresh interval)."""
    user.tokens_valid_after = now


def logout(*, session: Session, principal: Principal) -> None:
    """Give up the caller's token before it expires; other sessions of the user stay signed in."""
    now = datetime.now(UTC)
    auth_repository.revoke_token(session, jti=principal.jti, expires_at=datetime.fromtimestamp(principal.exp, UTC))
    auth_repository.delete_expired_revocations(session, now=now)
    session.commit()
    log.info("logout", extra={"fields": {"event": "logout"}})


def revocations(*, session: Session, settings: Settings) -> Revocations:
    """Everything a token verifier must refuse besides bad signatures and expiry (for the gateway).

    Cut-offs older than the longest token lifetime concern only expired tokens and are left out,
    so the answer stays small however many users ever changed their password.
    """
    now = datetime.now(UTC)
    since = now - timedelta(seconds=settings.jwt.ttl_s + REVOCATION_MARGIN_S)
    cutoffs, jtis = auth_repository.revocations(session, cutoffs_since=since, now=now)
    return Revocations(
        as_of=now.timestamp(),
        users=[UserCutoff(sub=email, tokens_valid_after=cutoff.timestamp()) for email, cutoff in cutoffs],
        token_ids=list(jtis),
    )


def require_admin(*, user: User) -> User:
    """Refuse anyone whose current role (in the database, not just the token) is not ADMIN."""
    if user.role != Role.ADMIN:
        raise Forbidden()
    return user


def change_password(*, session: Session, settings: Settings, user: User, data: PasswordChange) -> None:
    """Replace the caller's password after checking the current one.

    Wrong current passwords count against the account's login limit (the same counter), so a
    stolen session cannot guess the password at the gateway's request rate and take the account.

    Raises:
        TooManyRequests: the account is locked by failed logins or failed checks here.
        BadRequest: the current password is wrong, or the new one equals it.
    """
    keys = [_account_key(session, settings, user.email)]
    now, window = _guard(session=session, settings=settings, keys=keys)
    if not verify_password(user.password_hash, data.current_password):
        _record_failure(session=session, keys=keys, now=now, window=window)
        log.info("password change refused", extra={"fields": {"event": "password_check_failed",
                                                               "user_id": str(user.id)}})
        raise BadRequest("Current password is wrong", errors={"currentPassword": "Does not match"})
    if data.new_password == data.current_password:
        raise BadRequest(errors={"newPassword": "Must differ from the current password"})
    auth_repository.delete_failures(session, keys=keys)
    user.password_hash = hash_password(data.new_password)
    user.password_changed_at = now
    _revoke_sessions(user, now=now)  # whoever knew the old password loses the sessions it opened
    session.commit()


def get_or_raise(*, session: Session, user_id: uuid.UUID) -> User:
    user = auth_repository.get_user(session, user_id)
    if user is None:
        raise NotFound("User not found")
    return user


def list_users(*, session: Session, limit: int, offset: int) -> tuple[Sequence[User], int]:
    """One page of users and the total count."""
    return auth_repository.list_users(session, limit=limit, offset=offset)


def create(*, session: Session, data: UserCreate) -> User:
    """Create a user; an email already used (in any letter case) is a conflict."""
    if auth_repository.get_user_by_email(session, data.email) is not None:
        raise Conflict("Email already used", errors={"email": "Email already used"})
    user = User(
        id=uuid.uuid4(),
        email=data.email,
        password_hash=hash_password(data.password),
        role=str(data.role),
        active=data.active,
    )
    try:
        auth_repository.add_user(session, user)
        session.commit()
    except IntegrityError as exc:  # a concurrent create of the same email won the race
        session.rollback()
        raise Conflict("Email already used", errors={"email": "Email already used"}) from exc
    session.refresh(user)
    log.info("user created", extra={"fields": {"event": "user_created", "user_id": str(user.id), "role": user.role}})
    return user


def update(*, session: Session, user: User, data: UserUpdate) -> User:
    """Change a user's role or active flag, never leaving the platform without an active admin."""
    changes = data.model_dump(exclude_unset=True)
    if not changes or any(value is None for value in changes.values()):
        raise BadRequest(errors={"body": "Give role and/or active (not null)"})
    new_role = str(changes.get("role", user.role))
    new_active = bool(changes.get("active", user.active))
    loses_admin = user.role == Role.ADMIN and user.active and (new_role != Role.ADMIN or not new_active)
    if loses_admin and auth_repository.count_active_admins(session, lock=True) <= 1:
        session.rollback()
        raise Conflict("The last active admin cannot be demoted or deactivated",
                       errors={"role": "Last active admin"})
    if (new_role, new_active) != (user.role, user.active):
        _revoke_sessions(user, now=datetime.now(UTC))  # a token carries the old role: make it log in again
    user.role = new_role
    user.active = new_active
    session.commit()
    session.refresh(user)
    log.info("user updated", extra={"fields": {"event": "user_updated", "user_id": str(user.id), "role": user.role}})
    return user


def admin_password(settings: Settings) -> str | None:
    """The first admin's password: the setting, or in embedded mode a generated one kept in the data dir."""
    if settings.admin_password is not None:
        return settings.admin_password.get_secret_value()
    if settings.mode is Mode.EMBEDDED:
        return read_or_create_secret(settings.secrets_dir / ADMIN_PASSWORD_FILE, nbytes=18)
    return None


def ensure_admin(*, session: Session, settings: Settings) -> bool:
    """Create the first admin when no user has ``settings.admin_email``; True when one was created.

    Raises:
        ValueError: ``PMS_ADMIN_PASSWORD`` is set but breaks the password rules.
    """
    password = admin_password(settings)
    if password is None:
        log.warning(
            "no admin password configured: set PMS_ADMIN_PASSWORD (and PMS_ADMIN_EMAIL) and restart "
            "the auth service to create the first admin"
        )
        return False
    email = normalize_email(settings.admin_email)
    check_password(password)
    if auth_repository.get_user_by_email(session, email) is not None:
        return False
    try:
        auth_repository.add_user(session, User(
            id=uuid.uuid4(), email=email, password_hash=hash_password(password), role=str(Role.ADMIN), active=True,
        ))
        session.commit()
    except IntegrityError:  # another replica created it first
        session.rollback()
        return False
    log.info("first admin created", extra={"fields": {"event": "admin_created"}})
    return True
