"""The dashboard's only way to the platform: the gateway's REST API with a Bearer JWT.

Pages never build URLs or read HTTP statuses themselves. They call :class:`GatewayClient`
(or the cached read helpers at the bottom) and handle a few typed exceptions, so the
one error shape ``{"message", "errors"}`` is turned into Python exactly once, here.

No request or response body is ever logged: they carry names, emails and search terms.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import httpx
import jwt
import streamlit as st

from pms import forwarding

log = logging.getLogger("dashboard.client")

#: Seconds cached reads stay fresh. Short enough that a new registration shows up on the
#: next refresh, long enough that reruns (every widget change) do not hit the gateway.
PATIENTS_TTL_S = 5
ANALYTICS_TTL_S = 5
USERS_TTL_S = 5

DEFAULT_TIMEOUT = httpx.Timeout(8.0, connect=2.0)
#: Seconds Sign out waits for the gateway to revoke the token before signing out locally anyway.
LOGOUT_TIMEOUT_S = 2.0


# --- errors ---------------------------------------------------------------------------------


class GatewayError(Exception):
    """A refused or failed gateway call, carrying the server's message and per-field reasons."""

    status: int = 0

    def __init__(self, message: str, *, status: int | None = None, errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.errors = dict(errors or {})


class InvalidInput(GatewayError):
    """400: the server names the fields it refused in ``errors``."""

    status = 400


class NotAuthenticated(GatewayError):
    """401: wrong login, or the session token expired or was revoked."""

    status = 401


class PermissionDenied(GatewayError):
    """403: the caller's role may not do this (the UI hides it, the server refuses it anyway)."""

    status = 403


class NotFound(GatewayError):
    status = 404


class Conflict(GatewayError):
    """409: e-mail already used, or a stale ``If-Match`` version."""

    status = 409


class RateLimited(GatewayError):
    """429: too many attempts; ``retry_after`` seconds until the next one may succeed."""

    status = 429

    def __init__(self, message: str, *, retry_after: int | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class GatewayUnavailable(GatewayError):
    """The gateway (or a service behind it) is down or too slow: 502/503/504 or no connection."""

    status = 503


class ServerError(GatewayError):
    """500 or another 5xx that is not an upstream outage: the request reached a service that failed."""

    status = 500


_BY_STATUS: dict[int, type[GatewayError]] = {
    400: InvalidInput,
    401: NotAuthenticated,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    422: InvalidInput,
    429: RateLimited,
    502: GatewayUnavailable,
    503: GatewayUnavailable,
    504: GatewayUnavailable,
}


def error_from_response(response: httpx.Response) -> GatewayError:
    """Turn a non-2xx response in the one error shape into the matching exception."""
    message = f"Request failed ({response.status_code})"
    errors: dict[str, str] = {}
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("message"), str) and body["message"]:
            message = body["message"]
        raw = body.get("errors")
        if isinstance(raw, dict):
            errors = {str(k): str(v) for k, v in raw.items()}
    status = response.status_code
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else GatewayError)
    if cls is RateLimited:
        retry = response.headers.get("Retry-After", "")
        seconds = int(retry) if retry.isascii() and retry.isdigit() else None
        return RateLimited(message, status=status, errors=errors, retry_after=seconds)
    return cls(message, status=status, errors=errors)


# --- values ---------------------------------------------------------------------------------


#: Accounts per request when listing users (the auth API's largest page).
USERS_PAGE = 500


def _subject(token: str) -> str | None:
    """The account the token was issued to (its ``sub``: the e-mail as auth stores it).

    Read, not verified: the token came straight from the login answer, and every service verifies it
    on each call. The dashboard uses it to name the user and to give an expired session's draft back
    to the same account only; the typed e-mail lower-cased by Python can differ from the stored one
    (auth matches with PostgreSQL's ``lower()``), and then the owner would lose the draft.
    """
    try:
        subject = jwt.decode(token, options={"verify_signature": False}).get("sub")
    except jwt.PyJWTError:
        return None
    return subject if isinstance(subject, str) and subject else None


@dataclass(frozen=True, slots=True)
class AuthSession:
    """A signed-in user as the dashboard keeps it (in ``st.session_state`` only)."""

    token: str
    role: str
    email: str
    expires_at: float

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires_at


@dataclass(frozen=True, slots=True)
class PatientPage:
    items: list[dict[str, Any]]
    total: int
    limit: int
    offset: int


@dataclass(frozen=True, slots=True)
class Created:
    """A 201 answer: the new patient and the records the server thinks may be the same person."""

    patient: dict[str, Any]
    possible_duplicates: list[dict[str, Any]] = field(default_factory=list)


# --- the client -----------------------------------------------------------------------------


class GatewayClient:
    """Typed calls to the gateway. One instance per page run; cheap to build."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._timeout = timeout
        self._transport = transport

    # plumbing

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
        timeout: float | None = None,
    ) -> httpx.Response:
        sent_headers = {"Accept": "application/json", **(headers or {})}
        if auth and self.token:
            sent_headers["Authorization"] = f"Bearer {self.token}"
        clean_params = {k: v for k, v in (params or {}).items() if v is not None and v != ""}
        try:
            with httpx.Client(base_url=self.base_url, timeout=timeout or self._timeout,
                              transport=self._transport) as http:
                response = http.request(method, path, params=clean_params, json=json, headers=sent_headers)
        except httpx.TimeoutException as exc:
            log.warning("gateway timeout", extra={"fields": {"method": method, "error": type(exc).__name__}})
            raise GatewayUnavailable("The gateway did not answer in time.", status=504) from exc
        except httpx.TransportError as exc:
            log.warning("gateway unreachable", extra={"fields": {"method": method, "error": type(exc).__name__}})
            raise GatewayUnavailable("The gateway cannot be reached.", status=503) from exc
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise GatewayUnavailable("The gateway sent an unreadable answer.", status=502) from exc

    # auth

    def health(self) -> bool:
        """Whether the gateway answers its liveness probe."""
        try:
            self._request("GET", "/health", auth=False)
            return True
        except GatewayError:
            return False

    def login(self, *, email: str, password: str, on_behalf_of: str | None = None,
              forwarding_key: bytes | None = None) -> AuthSession:
        """Exchange credentials for a token.

        ``on_behalf_of`` is the browser's address; signed with ``forwarding_key`` the gateway counts
        failures against it instead of the dashboard's own address (see :mod:`pms.forwarding`).

        Raises:
            NotAuthenticated: wrong pair (the server does not say which half).
            RateLimited: too many failures; ``retry_after`` says how long to wait.
        """
        vouch = forwarding.sign(forwarding_key, on_behalf_of) if on_behalf_of and forwarding_key else None
        body = self._json(self._request("POST", "/auth/login", json={"email": email, "password": password},
                                        headers=vouch, auth=False))
        expires_in = int(body.get("expiresIn") or 3600)
        token = str(body["token"])
        return AuthSession(
            token=token,
            role=str(body.get("role") or "STAFF").upper(),
            email=_subject(token) or email.strip().lower(),
            expires_at=time.time() + expires_in,
        )

    def logout(self) -> None:
        """Give up this token at auth, so it stops working everywhere before it expires.

        A short timeout: signing out must not freeze the page when the gateway is slow.
        """
        self._request("POST", "/auth/logout", timeout=LOGOUT_TIMEOUT_S)

    def me(self) -> dict[str, Any]:
        return dict(self._json(self._request("GET", "/auth/me")))

    # patients

    def list_patients(self, *, q: str | None = None, limit: int = 25, offset: int = 0) -> PatientPage:
        response = self._request("GET", "/api/patients", params={"q": q, "limit": limit, "offset": offset})
        items = self._json(response)
        if isinstance(items, dict):  # tolerate a {"items": [...], "total": n} page shape as well
            total = int(items.get("total", 0))
            items = items.get("items", [])
        else:
            total = int(response.headers.get("X-Total-Count", len(items)))
        return PatientPage(items=list(items), total=total, limit=limit, offset=offset)

    def get_patient(self, patient_id: str) -> dict[str, Any]:
        return dict(self._json(self._request("GET", f"/api/patients/{patient_id}")))

    def create_patient(self, data: dict[str, Any]) -> Created:
        body = dict(self._json(self._request("POST", "/api/patients", json=data)))
        duplicates = body.pop("possibleDuplicates", None) or []
        return Created(patient=body, possible_duplicates=list(duplicates))

    def update_patient(self, patient_id: str, data: dict[str, Any], *, version: int | None) -> dict[str, Any]:
        """Update with ``If-Match: version``; a stale version raises :class:`Conflict`."""
        headers = {"If-Match": str(version)} if version is not None else {}
        return dict(self._json(self._request("PUT", f"/api/patients/{patient_id}", json=data, headers=headers)))

    def delete_patient(self, patient_id: str) -> None:
        self._request("DELETE", f"/api/patients/{patient_id}")

    def patient_audit(self, patient_id: str) -> list[dict[str, Any]]:
        body = self._json(self._request("GET", f"/api/patients/{patient_id}/audit"))
        return list(body.get("items", []) if isinstance(body, dict) else body)

    def patient_fhir(self, patient_id: str) -> bytes:
        """The patient as a FHIR R4 ``Patient`` resource, raw JSON bytes for download."""
        return self._request("GET", f"/api/patients/{patient_id}/fhir",
                             headers={"Accept": "application/fhir+json, application/json"}).content

    # analytics

    def analytics(self, name: str, **params: Any) -> dict[str, Any]:
        """One of ``summary``, ``registrations``, ``demographics``, ``geography``, ``billing``, ``freshness``."""
        if name not in ("summary", "registrations", "demographics", "geography", "billing", "freshness"):
            raise ValueError(f"unknown analytics view {name!r}")
        clean = {k: v.isoformat() if isinstance(v, date) else v for k, v in params.items()}
        body = self._json(self._request("GET", f"/api/analytics/{name}", params=clean))
        return dict(body) if isinstance(body, dict) else {"items": body}

    # users (ADMIN)

    def list_users(self) -> list[dict[str, Any]]:
        """Every account, page by page (the API gives at most 500 at a time; the page showed only those)."""
        users: list[dict[str, Any]] = []
        while True:
            reply = self._request("GET", "/auth/users", params={"limit": USERS_PAGE, "offset": len(users)})
            body = self._json(reply)
            page = list(body.get("items", []) if isinstance(body, dict) else body)
            users += page
            total = int(reply.headers.get("X-Total-Count") or len(users))
            if len(page) < USERS_PAGE or len(users) >= total:
                return users

    def create_user(self, *, email: str, password: str, role: str) -> dict[str, Any]:
        return dict(self._json(self._request("POST", "/auth/users",
                                             json={"email": email, "password": password, "role": role})))

    def update_user(self, user_id: str, *, role: str | None = None, active: bool | None = None) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        if role is not None:
            changes["role"] = role
        if active is not None:
            changes["active"] = active
        return dict(self._json(self._request("PATCH", f"/auth/users/{user_id}", json=changes)))


# --- cached reads ---------------------------------------------------------------------------
# Keyed by gateway URL and token, so one user's cache never answers another user's request.
# Exceptions are not cached: a failed call is retried on the next rerun.


@st.cache_data(ttl=PATIENTS_TTL_S, show_spinner=False, max_entries=256)
def cached_patients(base_url: str, token: str, q: str, limit: int, offset: int) -> PatientPage:
    return GatewayClient(base_url, token).list_patients(q=q or None, limit=limit, offset=offset)


@st.cache_data(ttl=ANALYTICS_TTL_S, show_spinner=False, max_entries=256)
def cached_analytics(base_url: str, token: str, name: str, params: tuple[tuple[str, Any], ...] = ()) -> dict[str, Any]:
    return GatewayClient(base_url, token).analytics(name, **dict(params))


@st.cache_data(ttl=USERS_TTL_S, show_spinner=False, max_entries=32)
def cached_users(base_url: str, token: str) -> list[dict[str, Any]]:
    return GatewayClient(base_url, token).list_users()


def forget_patients() -> None:
    """Drop cached patient lists after a write, so the user sees their change at once."""
    cached_patients.clear()


def forget_users() -> None:
    cached_users.clear()
