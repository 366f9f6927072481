"""Tables of the auth database (Alembic owns the DDL: see ``migrations/versions``)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, DateTime, Identity, Index, String, func
from sqlalchemy.dialects.postgresql import CITEXT
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pms.db import new_metadata


class Base(DeclarativeBase):
    metadata = new_metadata()


class User(Base):
    """A person who may log in; ``email`` is unique regardless of case (citext)."""

    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint("role IN ('ADMIN', 'STAFF', 'ANALYST')", name="role_known"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    email: Mapped[str] = mapped_column(CITEXT, unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(default=True, server_default="true")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
    password_changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    #: Tokens of this user issued before this instant are refused (set on a role, active or password change).
    tokens_valid_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RevokedToken(Base):
    """One token given up before it expired (logout), by its ``jti``; pruned once it would have expired.

    Holds no user data: the gateway only needs the id to refuse the token.
    """

    __tablename__ = "revoked_tokens"
    __table_args__ = (Index(None, "expires_at"),)

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class LoginFailure(Base):
    """One failed login, keyed by a hashed account or a client address, for brute-force limits.

    Kept in the database (not process memory) so the limit survives restarts and holds across
    replicas. ``key`` never holds a raw email: accounts are stored as a SHA-256 digest.
    """

    __tablename__ = "login_failures"
    __table_args__ = (Index(None, "key", "failed_at"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    key: Mapped[str] = mapped_column(String(128))
    failed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
