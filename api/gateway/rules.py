"""Which upstream serves a path and which roles may call it: the gateway's whole policy as data.

Deny by default: a path under ``/auth`` that is not listed here is answered 404 by the
gateway and never reaches the auth service.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pms.security import Role
from pms.settings import Settings


class Upstream(StrEnum):
    AUTH = "auth"
    PATIENT = "patient"
    ANALYTICS = "analytics"


#: Anyone may call (the upstream checks the token itself where it needs one).
PUBLIC: frozenset[Role] = frozenset()
PATIENT_ROLES = frozenset({Role.STAFF, Role.ADMIN})
#: STAFF reads analytics for the dashboard's analytics page; ANALYST reads analytics and nothing else.
ANALYTICS_ROLES = frozenset({Role.ANALYST, Role.ADMIN, Role.STAFF})
ADMIN_ONLY = frozenset({Role.ADMIN})

READ_METHODS = ("GET", "HEAD")
ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")

#: Gateway prefix -> (upstream, path prefix on the upstream).
PREFIXES: dict[Upstream, tuple[str, str]] = {
    Upstream.AUTH: ("/auth", ""),
    Upstream.PATIENT: ("/api/patients", "/patients"),
    Upstream.ANALYTICS: ("/api/analytics", "/analytics"),
}

#: ``/api-docs/<name>`` -> the upstream whose ``/openapi.json`` it shows (seed names and ours).
DOCS: dict[str, Upstream] = {
    "auth": Upstream.AUTH,
    "patients": Upstream.PATIENT,
    "patient": Upstream.PATIENT,
    "analytics": Upstream.ANALYTICS,
}


@dataclass(frozen=True, slots=True)
class Access:
    """Who may call a path: ``roles`` empty means public."""

    roles: frozenset[Role]

    @property
    def public(self) -> bool:
        return not self.roles


def base_url(settings: Settings, upstream: Upstream) -> str:
    section = {Upstream.AUTH: settings.auth, Upstream.PATIENT: settings.patient,
               Upstream.ANALYTICS: settings.analytics}[upstream]
    return section.base_url.rstrip("/")


def safe_subpath(subpath: str) -> bool:
    """Refuse dot segments and empty segments, so ``/auth/me/../users`` cannot dodge the rules."""
    if not subpath:
        return True
    segments = subpath.split("/")
    return all(seg not in (".", "..") for seg in segments) and "\\" not in subpath and "" not in segments[:-1]


def auth_access(subpath: str) -> Access | None:
    """Access rule for ``/auth/<subpath>``; None when the gateway does not expose it."""
    head = subpath.split("/", 1)[0]
    if subpath in ("login", "validate", "logout") or head == "me":
        return Access(PUBLIC)
    if head == "users":
        return Access(ADMIN_ONLY)
    return None


def access_for(upstream: Upstream, subpath: str) -> Access | None:
    """Access rule for a path under ``upstream``'s gateway prefix (None -> 404)."""
    if not safe_subpath(subpath):
        return None
    if upstream is Upstream.AUTH:
        return auth_access(subpath)
    if upstream is Upstream.PATIENT:
        # The audit trail is ADMIN-only at the patient service too; refuse it here first.
        if subpath.rstrip("/").endswith("/audit"):
            return Access(ADMIN_ONLY)
        return Access(PATIENT_ROLES)
    return Access(ANALYTICS_ROLES)


def upstream_path(upstream: Upstream, subpath: str) -> str:
    """The path on the upstream for ``subpath`` under the gateway prefix."""
    _, target = PREFIXES[upstream]
    return f"{target}/{subpath}" if subpath else (target or "/")


def gateway_location(upstream: Upstream, location: str, upstream_base: str) -> str:
    """Rewrite an upstream ``Location`` (absolute or relative) into the gateway's own path space."""
    prefix, target = PREFIXES[upstream]
    path = location.removeprefix(upstream_base) if location.startswith(upstream_base) else location
    if not path.startswith("/"):
        return location  # someone else's URL: leave it alone
    if target and (path == target or path.startswith(target + "/") or path.startswith(target + "?")):
        return prefix + path[len(target):]
    if not target:
        return prefix + path
    return location
