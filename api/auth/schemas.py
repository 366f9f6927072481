"""Request and response bodies of the auth service (camelCase on the wire, like the seed)."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from functools import lru_cache
from importlib import resources
from typing import Annotated, Literal

from email_validator import EmailNotValidError, validate_email
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool
from pydantic.alias_generators import to_camel

from pms.security import Role

#: Upper bound on password length: argon2 accepts anything, but a 1 MB "password" is a DoS.
MAX_PASSWORD_LENGTH = 128
MIN_PASSWORD_LENGTH = 12
#: Intranet domains (``admin@pms.local``) are fine for a clinic's own users even though
#: email-validator calls them special-use.
_INTRANET_SUFFIXES = (".local", ".internal", ".lan")
_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$")


@lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    """The bundled list of common passwords, lower-cased."""
    text = (resources.files("api.auth") / "common_passwords.txt").read_text(encoding="utf-8")
    return frozenset(line.strip().lower() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def normalize_email(value: str) -> str:
    """Validate an address's syntax (no DNS) and lower-case its domain."""
    value = value.strip()
    if len(value) > 254:
        raise ValueError("Email address is too long")
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        local, _, domain = value.rpartition("@")
        domain = domain.lower()
        if local and domain.endswith(_INTRANET_SUFFIXES) and _DOMAIN_RE.match(domain):
            try:
                validate_email(f"{local}@example.com", check_deliverability=False)
            except EmailNotValidError as inner:
                raise ValueError("Not a valid email address") from inner
            return f"{local}@{domain}"
        raise ValueError("Not a valid email address") from exc


def check_password(value: str) -> str:
    """Refuse short passwords and ones from the common-passwords list."""
    if len(value) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"Password must be at least {MIN_PASSWORD_LENGTH} characters")
    if len(value) > MAX_PASSWORD_LENGTH:
        raise ValueError(f"Password must be at most {MAX_PASSWORD_LENGTH} characters")
    if value.lower() in common_passwords() or len(set(value)) < 4:
        raise ValueError("Password is too common; choose a longer, less guessable one")
    return value


Email = Annotated[str, Field(max_length=254), AfterValidator(normalize_email)]
NewPassword = Annotated[str, AfterValidator(check_password)]


class CamelModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class LoginRequest(CamelModel):
    # No format rules on login: any bad pair is the same 401, never a 400 that says which part was wrong.
    email: str = Field(min_length=1, max_length=254)
    password: str = Field(min_length=1, max_length=1024)


class TokenResponse(CamelModel):
    token: str
    token_type: Literal["Bearer"] = "Bearer"
    expires_in: int = Field(description="Seconds until the token expires")
    role: Role


class ValidateResponse(CamelModel):
    sub: str
    role: Role
    exp: int


class UserCutoff(CamelModel):
    sub: str
    tokens_valid_after: float = Field(description="Tokens of ``sub`` issued before this Unix time are refused")


class Revocations(CamelModel):
    """What a token verifier outside auth (the gateway) must refuse on top of signature and expiry."""

    as_of: float = Field(description="Unix time of this answer")
    users: list[UserCutoff]
    token_ids: list[str] = Field(description="``jti`` of logged-out tokens that have not expired yet")


class PasswordChange(CamelModel):
    current_password: str = Field(min_length=1, max_length=1024)
    new_password: NewPassword


class UserCreate(CamelModel):
    email: Email
    password: NewPassword
    role: Role = Role.STAFF
    #: Strict: "yes" or "no" must not switch an account on or off.
    active: StrictBool = True


class UserUpdate(CamelModel):
    role: Role | None = None
    active: StrictBool | None = None


class UserRead(CamelModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)

    id: uuid.UUID
    email: str
    role: Role
    active: bool
    created_at: datetime
    updated_at: datetime
