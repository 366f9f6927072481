"""Request and response bodies of the patient API (the seed's camelCase names).

The seed tutorial's create payload (name, email, address, dateOfBirth, registeredDate)
is accepted as it is; every newer field is optional. Unknown fields are rejected so a
typo never silently drops data.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.alias_generators import to_camel

Gender = Literal["male", "female", "other", "unknown"]
EARLIEST_BIRTH_DATE = date(1900, 1, 1)
#: Region used for phone numbers written without a +country prefix (the seed's data is US-style).
DEFAULT_PHONE_REGION = "US"
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Embeddings, overrides and isolates: they make stored text display as something else ("evil.exe" as "exe.live").
_BIDI_CONTROL = re.compile(r"[\u202a-\u202e\u2066-\u2069]")


def _iso_date(value: Any) -> Any:
    """Accept only ``YYYY-MM-DD`` strings (no timestamps, numbers or datetimes)."""
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _ISO_DATE.match(value):
        raise ValueError("Must be an ISO date (YYYY-MM-DD)")
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise ValueError("Must be a valid calendar date (YYYY-MM-DD)") from exc


IsoDate = Annotated[date, BeforeValidator(_iso_date)]


def normalize_email(value: str) -> str:
    """Validate an address and return it with a lower-cased domain (no DNS lookup)."""
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError("Must be a valid email address") from exc


def normalize_phone(value: str) -> str:
    """Return a phone number in E.164 form, or raise ``ValueError``."""
    try:
        parsed = phonenumbers.parse(value, None if value.strip().startswith("+") else DEFAULT_PHONE_REGION)
    except phonenumbers.NumberParseException as exc:
        raise ValueError("Must be a valid phone number") from exc
    if not phonenumbers.is_valid_number(parsed):
        raise ValueError("Must be a valid phone number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              str_strip_whitespace=True)


class _PatientFields(_Camel):
    """Fields shared by create and update, with their rules."""

    name: str = Field(min_length=1, max_length=100, strict=True)
    email: str = Field(max_length=254, strict=True)  # too short: normalize_email's own reason
    address: str = Field(min_length=1, max_length=255, strict=True)
    date_of_birth: IsoDate
    gender: Gender | None = None
    phone: str | None = Field(default=None, max_length=32, strict=True)
    city: str | None = Field(default=None, max_length=100, strict=True)

    @field_validator("name", "address", "city")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        """Refuse control characters; store the composed (NFC) form, so "Renée" typed with a combining
        accent is the same text as "Renée" typed with é: found by the same search, and a duplicate."""
        if value is not None and _CONTROL.search(value):
            raise ValueError("Must not contain control characters")
        if value is not None and _BIDI_CONTROL.search(value):
            raise ValueError("Must not contain text-direction control characters")
        return unicodedata.normalize("NFC", value) if value is not None else None

    @field_validator("name")
    @classmethod
    def _legible(cls, value: str) -> str:
        """A name of only invisible characters (a zero-width space) showed as a blank patient."""
        if not any(unicodedata.category(ch)[0] in "LN" for ch in value):
            raise ValueError("Must contain a letter")
        return value

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        return normalize_email(value)

    @field_validator("phone")
    @classmethod
    def _phone(cls, value: str | None) -> str | None:
        return normalize_phone(value) if value else None

    @field_validator("gender", mode="before")
    @classmethod
    def _gender(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("date_of_birth")
    @classmethod
    def _birth(cls, value: date) -> date:
        if value > latest_calendar_date():
            raise ValueError("Must not be in the future")
        if value < EARLIEST_BIRTH_DATE:
            raise ValueError("Must not be before 1900-01-01")
        return value

    @field_validator("city")
    @classmethod
    def _city(cls, value: str | None) -> str | None:
        return value or None


def _clock() -> datetime:
    return datetime.now(UTC)


def latest_calendar_date() -> date:
    """The latest date it is anywhere on Earth now (UTC+14).

    Dates of birth and registration are calendar dates without a time zone. Compared with the
    server's own today, a clinic ahead of the server (UTC+10 against a UTC container) had today's
    date refused as "in the future" every morning until the server's midnight.
    """
    return (_clock() + timedelta(hours=14)).date()


def _not_future(value: date | None) -> date | None:
    if value is not None and value > latest_calendar_date():
        raise ValueError("Must not be in the future")
    return value


def _registration(value: date | None, info: ValidationInfo) -> date | None:
    """Not in the future, and not before the birth date (nor 1900) it would then precede."""
    value = _not_future(value)
    born = info.data.get("date_of_birth")
    if value is not None and isinstance(born, date) and value < born:
        raise ValueError("Must not be before the date of birth")
    if value is not None and value < EARLIEST_BIRTH_DATE:
        raise ValueError("Must not be before 1900-01-01")
    return value


class PatientCreate(_PatientFields):
    """POST /patients body."""

    registered_date: IsoDate

    _registered = field_validator("registered_date")(_registration)


class PatientUpdate(_PatientFields):
    """PUT /patients/{id} body: the seed's fields are required, newer ones keep their value when omitted."""

    registered_date: IsoDate | None = None

    _registered = field_validator("registered_date")(_registration)


class PatientRead(_Camel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)

    id: uuid.UUID
    mrn: str
    name: str
    email: str
    address: str
    city: str | None
    gender: str | None
    phone: str | None
    date_of_birth: date
    registered_date: date
    billing_account_id: str | None
    billing_status: str
    version: int
    created_at: datetime
    updated_at: datetime


class DuplicateCandidate(_Camel):
    """A patient that may be the same person (the dashboard shows these for review)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    id: uuid.UUID
    mrn: str
    name: str
    date_of_birth: date
    phone: str | None
    #: Why it matched: ``same_phone``, ``similar_name``, ``sounds_alike``.
    reasons: list[str]
    #: Trigram similarity of the names, 0..1.
    score: float


class PatientCreated(PatientRead):
    possible_duplicates: list[DuplicateCandidate] = Field(default_factory=list)


class AuditRead(_Camel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)

    actor: str
    action: str
    fields: list[str]
    version: int
    request_id: str | None
    at: datetime


