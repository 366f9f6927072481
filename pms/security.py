"""Passwords, JWTs and the caller identity every service checks.

The auth service signs tokens; the gateway and every service behind it verify them locally
with the shared key (defence in depth: a request that bypasses the gateway is still refused).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from fastapi import Depends, Request

from pms.errors import Forbidden, Unauthorized
from pms.settings import Settings


class Role(StrEnum):
    ADMIN = "ADMIN"
    STAFF = "STAFF"
    ANALYST = "ANALYST"


# OWASP Password Storage Cheat Sheet: argon2id, m=19 MiB, t=2, p=1.
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
#: A real hash verified against when the user does not exist, so timing does not reveal it.
_DUMMY_HASH = _hasher.hash("not-a-real-password-but-costs-the-same")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Constant-cost check: a missing user still pays for one argon2 verification."""
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """True when the stored hash uses parameters other than today's."""
    return _hasher.check_needs_rehash(password_hash)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token subject (user email) and role."""

    sub: str
    role: Role
    jti: str = ""
    exp: int = 0
    #: Issue time with sub-second precision, so a revocation at 10.4 s spares a token issued at 10.7 s.
    iat: float = 0.0
    #: Not valid before this time (the later of ``nbf`` and ``iat``), checked again on a remembered token.
    not_before: float = 0.0


def internal_audience(settings: Settings) -> str:
    """Audience of service-to-service tokens (the gateway reading auth's revocation list).

    User-facing verifiers only accept ``settings.jwt.audience``, so a leaked service token opens
    no API route; only endpoints that ask for this audience accept it.
    """
    return settings.jwt.audience + ":internal"


def encode_token(settings: Settings, *, sub: str, role: Role | str, ttl_s: int | None = None,
                 audience: str | None = None) -> str:
    """Sign a token with the pinned algorithm and every claim verifiers require."""
    now = datetime.now(UTC)
    ttl = settings.jwt.ttl_s if ttl_s is None else ttl_s
    claims: dict[str, Any] = {
        "sub": sub,
        "role": str(Role(role)),
        "iat": now.timestamp(),  # a non-integer NumericDate (RFC 7519): revocation cut-offs need the precision
        "nbf": now,
        "exp": now + timedelta(seconds=ttl),
        "iss": settings.jwt.issuer,
        "aud": audience or settings.jwt.audience,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, settings.jwt.key(), algorithm=settings.jwt.algorithm)


#: Seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``.
LEEWAY_S = 5
#: Verified tokens remembered per process (a token is ~300 bytes; staff send the same one for hours).
VERIFIED_TOKENS = 4096


def decode_token(settings: Settings, token: str, *, audience: str | None = None) -> Principal:
    """Verify signature, algorithm, expiry, issuer and audience; raise :class:`Unauthorized`.

    A token that verified once is remembered (:func:`_verified`, keyed by the key, audience,
    issuer and algorithm as well as the token), and only its expiry is checked again: PyJWT's
    decode was a fifth of the gateway's CPU per forwarded request and ~8% of the patient
    service's (py-spy), for a token every request of a session repeats. The signature and the
    claims cannot change for the same bytes under the same key; the times are checked again
    against the clock as PyJWT checks them (a clock set back must not make a token issued "in
    the future" acceptable). A token that fails is not remembered, so a bad token costs a full
    verification every time.
    """
    principal = _verified(settings.jwt.key(), settings.jwt.algorithm, audience or settings.jwt.audience,
                          settings.jwt.issuer, token)
    now = _now()
    if principal.exp <= now - LEEWAY_S:  # PyJWT's own rule (integer exp)
        raise Unauthorized("Token expired")
    if principal.not_before > now + LEEWAY_S:  # PyJWT: ImmatureSignatureError, answered "Invalid token"
        raise Unauthorized("Invalid token")
    return principal


def _now() -> float:
    return time.time()


@lru_cache(maxsize=VERIFIED_TOKENS)
def _verified(key: str, algorithm: str, audience: str, issuer: str, token: str) -> Principal:
    """The principal of a token that passes every check; raises (and so caches nothing) otherwise."""
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=audience,
            issuer=issuer,
            options={"require": ["sub", "role", "iat", "exp", "iss", "aud", "jti"]},
            leeway=LEEWAY_S,
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("Token expired") from exc
    except jwt.PyJWTError as exc:
        raise Unauthorized("Invalid token") from exc
    try:
        role = Role(claims["role"])
        issued_at = float(claims["iat"])
        # PyJWT's rule: whole seconds (int(iat), int(nbf)), whatever fraction the claims carry.
        not_before = float(max(int(claims["iat"]), int(claims.get("nbf", claims["iat"]))))
    except (TypeError, ValueError) as exc:
        raise Unauthorized("Invalid token") from exc
    return Principal(sub=str(claims["sub"]), role=role, jti=str(claims["jti"]), exp=int(claims["exp"]),
                     iat=issued_at, not_before=not_before)


def bearer_token(request: Request) -> str:
    """The token of an ``Authorization: Bearer ...`` header, or :class:`Unauthorized`."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Missing bearer token")
    return token.strip()


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with (``app.state.settings``)."""
    return request.app.state.settings


def verified_principal(request: Request) -> Principal:
    """The caller of a valid bearer token that auth has not revoked, or :class:`Unauthorized`.

    The revocation check applies where the app keeps a list (``app.state.revocations``,
    see :mod:`pms.revocation`): logout, deactivation, a role or password change.
    """
    principal = decode_token(get_app_settings(request), bearer_token(request))
    revocations = getattr(request.app.state, "revocations", None)
    if revocations is not None and revocations.refuses(principal):
        raise Unauthorized("Token revoked; log in again")
    return principal


def current_principal(request: Request) -> Principal:
    """FastAPI dependency: the verified caller (checks the token on every request)."""
    principal = verified_principal(request)
    request.state.principal = principal
    return principal


CurrentUser = Annotated[Principal, Depends(current_principal)]


def require_roles(*roles: Role) -> Any:
    """Dependency factory: the caller must hold one of ``roles`` (403 otherwise).

    ``async`` on purpose: verifying a token is microseconds of CPU and no I/O, and a sync
    dependency would cost a threadpool hop on every request.
    """
    allowed = frozenset(roles)

    async def _check(request: Request) -> Principal:
        principal = current_principal(request)
        if principal.role not in allowed:
            raise Forbidden()
        return principal

    return Depends(_check)
