"""Billing tables (Alembic owns the DDL: ``billing/migrations``).

Minimum necessary: an account is keyed by the patient's UUID and holds no name, email or
other contact data. Billing never needs them to open an account, and the patient service
already owns them; a copy here would be one more place to leak, correct and erase.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import CheckConstraint, DateTime, String, Uuid, func, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pms.db import new_metadata


class Base(DeclarativeBase):
    metadata = new_metadata()


class AccountStatus(StrEnum):
    ACTIVE = "ACTIVE"
    SUSPENDED = "SUSPENDED"
    CLOSED = "CLOSED"


class BillingAccount(Base):
    """One billing account per patient; the unique patient_id makes creation idempotent."""

    __tablename__ = "billing_accounts"
    __table_args__ = (
        CheckConstraint("status IN ('ACTIVE', 'SUSPENDED', 'CLOSED')", name="status_known"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, server_default=text("gen_random_uuid()"))
    patient_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False, unique=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default=AccountStatus.ACTIVE.value)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
