"""SQL of the auth service: users and login failures. No rules, no commits."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from api.auth.models import LoginFailure, RevokedToken, User


def get_user(session: Session, user_id: uuid.UUID) -> User | None:
    return session.get(User, user_id)


def get_user_by_email(session: Session, email: str) -> User | None:
    """Case-insensitive lookup (the column is citext)."""
    if "\x00" in email:  # PostgreSQL text cannot hold NUL: no such user (and no DataError -> 500)
        return None
    return session.scalars(select(User).where(User.email == email)).one_or_none()


def list_users(session: Session, *, limit: int, offset: int) -> tuple[Sequence[User], int]:
    total = session.scalar(select(func.count()).select_from(User)) or 0
    rows = session.scalars(select(User).order_by(User.created_at, User.id).limit(limit).offset(offset)).all()
    return rows, total


def count_active_admins(session: Session, *, lock: bool = False) -> int:
    """Active admins; ``lock`` takes row locks so two demotions cannot both pass the check."""
    query = select(User.id).where(User.role == "ADMIN", User.active.is_(True))
    if lock:
        query = query.with_for_update()
    return len(session.scalars(query).all())


def add_user(session: Session, user: User) -> User:
    session.add(user)
    session.flush()
    return user


def fold_email(session: Session, email: str) -> str:
    """``email`` case-folded as the database folds it when it compares emails (citext: its ``lower``).

    Python's ``str.lower`` differs for some letters (U+0130 "İ" becomes "i" + a combining dot in
    Python, "i" in PostgreSQL), so a key folded in Python gave one account several counters.
    """
    return str(session.execute(select(func.lower(email.strip()))).scalar_one())


def lock_keys(session: Session, *, keys: Sequence[str]) -> None:
    """Serialise logins that share a key until the transaction ends (sorted: no deadlocks)."""
    for key in sorted(set(keys)):
        session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": key})


def count_failures(session: Session, *, keys: Sequence[str], since: datetime) -> dict[str, tuple[int, datetime]]:
    """Per key: failures at or after ``since`` and the oldest of them."""
    rows = session.execute(
        select(LoginFailure.key, func.count(), func.min(LoginFailure.failed_at))
        .where(LoginFailure.key.in_(keys), LoginFailure.failed_at >= since)
        .group_by(LoginFailure.key)
    ).all()
    return {key: (int(count), oldest) for key, count, oldest in rows}


def add_failures(session: Session, *, keys: Sequence[str], at: datetime) -> None:
    session.add_all([LoginFailure(key=key, failed_at=at) for key in keys])
    session.flush()


def delete_failures(session: Session, *, keys: Sequence[str], before: datetime | None = None) -> None:
    """Forget failures of ``keys`` (all of them, or only those older than ``before``)."""
    query = delete(LoginFailure).where(LoginFailure.key.in_(keys))
    if before is not None:
        query = query.where(LoginFailure.failed_at < before)
    session.execute(query)


def revoke_token(session: Session, *, jti: str, expires_at: datetime) -> None:
    """Record a given-up token (idempotent: logging out twice is one row)."""
    session.execute(
        insert(RevokedToken).values(jti=jti, expires_at=expires_at).on_conflict_do_nothing(index_elements=["jti"])
    )


def is_token_revoked(session: Session, jti: str) -> bool:
    return session.get(RevokedToken, jti) is not None


def delete_expired_revocations(session: Session, *, now: datetime) -> None:
    """An expired token is refused anyway: its revocation row is no longer needed."""
    session.execute(delete(RevokedToken).where(RevokedToken.expires_at <= now))


def revocations(session: Session, *, cutoffs_since: datetime, now: datetime) -> tuple[
        Sequence[tuple[str, datetime]], Sequence[str]]:
    """Per-user cut-offs newer than ``cutoffs_since`` (older ones only concern expired tokens),
    and the ids of revoked tokens not yet expired."""
    cutoffs = session.execute(
        select(User.email, User.tokens_valid_after).where(User.tokens_valid_after > cutoffs_since)
    ).tuples().all()
    jtis = session.scalars(select(RevokedToken.jti).where(RevokedToken.expires_at > now)).all()
    return cutoffs, jtis
