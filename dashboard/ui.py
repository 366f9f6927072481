"""Session, role and formatting helpers every page shares.

The JWT lives only in ``st.session_state`` (one browser tab's server-side session): never in
a cookie, the URL or a log. When the gateway says the token is no longer valid the user is
sent back to the login page with a note instead of a stack trace.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import streamlit as st

from dashboard.client import (
    AuthSession,
    Created,
    GatewayClient,
    GatewayError,
    GatewayUnavailable,
    PermissionDenied,
    ServerError,
)
from dashboard.serve import GATEWAY_ARG
from pms import forwarding

AUTH_KEY = "auth"
NOTE_KEY = "login_note"
#: Tests (and ``pms serve dashboard``) may point the app at another gateway through this key.
GATEWAY_KEY = "gateway_url"

ADMIN, STAFF, ANALYST = "ADMIN", "STAFF", "ANALYST"
PATIENT_ROLES = frozenset({ADMIN, STAFF})
ANALYTICS_ROLES = frozenset({ADMIN, STAFF, ANALYST})

#: Also what a user sees whose token was revoked (signed out elsewhere, role changed, deactivated).
SESSION_EXPIRED_NOTE = "Your session has expired or was ended by a change to your account. Please sign in again."

#: The Register page's form number (a new, empty form after each registration) and its widgets' keys.
REGISTER_FORM_N_KEY = "register_form_n"
#: The Register page's last registration (a :class:`Created`), and whether its possible duplicates were accepted.
REGISTER_RESULT_KEY = "register_result"
REGISTER_CONFIRMED_KEY = "register_confirmed"
#: The patient open on the Patients page (its id).
PATIENT_ID_KEY = "patient_id"
#: The record the Patients page's Edit form edits: (patient id, version opened, the record as opened).
EDIT_BASE_KEY = "edit_base"
#: The patient whose Edit tab opens first: an edit given back after an expired session (see :class:`Draft`).
EDIT_REOPEN_KEY = "edit_reopen"
#: The gender choices of the patient forms ("" = not stated).
GENDERS = ("", "female", "male", "other", "unknown")
#: Fields of the Edit form (API names), each a widget keyed by :func:`edit_field_key`.
EDIT_FIELDS = ("name", "email", "phone", "address", "city", "dateOfBirth", "gender")
#: What a user had submitted in a form when the session expired, kept for that user's next sign-in.
DRAFT_KEY = "expired_draft"
#: The pages whose kept draft was given back (``register``, ``patients``): each says so once
#: (:func:`draft_restored`).
DRAFT_RESTORED_KEY = "draft_restored"
#: The page the app opens once after such a sign-in (the registration first, if both were interrupted).
DRAFT_OPEN_KEY = "draft_open"
REGISTER_PAGE, PATIENTS_PAGE = "register", "patients"


@dataclass(frozen=True, slots=True)
class Draft:
    """Form input kept across a session expiry, for ``owner`` only (it is patient data).

    ``values`` are session-state entries (widget keys and what they need around them) put back as
    they were; ``pages`` are the pages they belong to.
    """

    owner: str
    values: dict[str, Any]
    pages: frozenset[str]
    kept_at: float

    @property
    def stale(self) -> bool:
        """Older than ``PMS_DASHBOARD__DRAFT_MAX_AGE_S``: dropped, never given back."""
        from pms.settings import get_settings

        return time.time() - self.kept_at > get_settings().dashboard.draft_max_age_s


def drop_stale_draft() -> None:
    """Forget a kept draft nobody came back for in time (the app calls this on every run while signed
    out, so before any sign-in)."""
    draft = st.session_state.get(DRAFT_KEY)
    if isinstance(draft, Draft) and draft.stale:
        del st.session_state[DRAFT_KEY]


_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()#+\-.!|~<>$:&])")
#: ``http:``, ``www.``: GFM links these even with their punctuation escaped, after any punctuation (``_http:``).
_LINK_START = re.compile(r"(?i)(https?|ftp|www|mailto)(?=[:.])")
#: ``:material/home:``, ``:red[...]``: Streamlit's icons and colours, also matched through escapes.
_DIRECTIVE_START = re.compile(r"(?i):(?=[a-z0-9_/-]+[:\[])")
_WORD_JOINER = "\u2060"


def md_text(value: object) -> str:
    """``value`` (patient or user data, a server's message) as literal text inside Streamlit Markdown.

    Stored text is data, not formatting: a name such as ``[verify](https://evil.example)`` or
    ``![x](http://host/pixel.png)`` rendered a link, or fetched an image from the staff member's
    browser. Markdown punctuation is backslash-escaped; links GFM finds without punctuation and
    Streamlit's ``:icon:``/``:color[]`` are broken with an invisible word joiner. An e-mail address
    stays a ``mailto:`` link, which is what it is.
    """
    text = _DIRECTIVE_START.sub(":" + _WORD_JOINER, _LINK_START.sub("\\1" + _WORD_JOINER, str(value)))
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", text)


def gateway_url() -> str:
    """The gateway base URL: a per-session override (tests), the ``--gateway-url=`` script argument
    that ``pms serve dashboard`` passes, else the platform settings (``streamlit run`` by hand)."""
    override = st.session_state.get(GATEWAY_KEY)
    if override:
        return str(override)
    for arg in sys.argv[1:]:
        if arg.startswith(GATEWAY_ARG):
            return arg.removeprefix(GATEWAY_ARG)
    from pms.settings import get_settings

    return get_settings().gateway.base_url


def forwarding_key() -> bytes | None:
    """The key that vouches for the browser's address to the gateway (``pms serve dashboard`` sets it);
    None under ``streamlit run`` by hand, where logins count against the dashboard's own address."""
    raw = os.environ.get(forwarding.KEY_VARIABLE, "")
    try:
        return bytes.fromhex(raw) or None
    except ValueError:
        return None


def register_field_key(n: int, field: str) -> str:
    """The session-state key of field ``field`` of the ``n``-th Register form of this session."""
    return f"reg_{n}_{field}"


def _register_draft() -> dict[str, Any]:
    """The current Register form's entries, if something was typed in it (else nothing to keep).

    Only text counts as typed: the dates and the gender have defaults, and a form left untouched
    (or the fresh one after a registration) is not an interrupted registration.
    """
    n = st.session_state.get(REGISTER_FORM_N_KEY)
    if not isinstance(n, int):
        return {}
    prefix = register_field_key(n, "")
    values = {key: value for key, value in st.session_state.items() if isinstance(key, str) and key.startswith(prefix)}
    if not any(isinstance(value, str) and value.strip() for value in values.values()):
        return {}
    return {REGISTER_FORM_N_KEY: n, **values}


def undecided_duplicate() -> Created | None:
    """The last registration if its possible duplicates were neither kept nor discarded yet (the record
    exists: an expiry keeps it, so the user is asked again and a duplicate does not stay unnoticed)."""
    result = st.session_state.get(REGISTER_RESULT_KEY)
    if isinstance(result, Created) and result.possible_duplicates and not st.session_state.get(REGISTER_CONFIRMED_KEY):
        return result
    return None


def edit_field_key(patient_id: str, version: object, field: str) -> str:
    """The session-state key of field ``field`` of the Edit form of ``patient_id`` at ``version``."""
    return f"edit_{patient_id}_v{version}_{field}"


def is_edit_field_key(key: object, patient_id: str) -> bool:
    """Whether ``key`` is one of :func:`edit_field_key`'s keys for ``patient_id`` (any version)."""
    return isinstance(key, str) and key.startswith(f"edit_{patient_id}_v")


def edit_shown_value(shown: dict[str, Any], field: str) -> Any:
    """What the Edit form shows for ``field`` of the record as opened (its widget's starting value)."""
    if field == "dateOfBirth":
        return date.fromisoformat(shown["dateOfBirth"]) if shown.get("dateOfBirth") else None
    value = shown.get(field) or ""
    return value if field != "gender" or value in GENDERS else ""


def _edit_draft() -> dict[str, Any]:
    """The open record's Edit form as last submitted, if that changes the record as opened (else nothing
    to keep). An edit without a version is not kept: saved later without ``If-Match``, it would
    overwrite a colleague's changes with the values it was opened with."""
    base = st.session_state.get(EDIT_BASE_KEY)
    if not (isinstance(base, tuple) and len(base) == 3):
        return {}
    patient_id, version, shown = base
    if version is None or patient_id != st.session_state.get(PATIENT_ID_KEY):
        return {}
    keys = {field: edit_field_key(patient_id, version, field) for field in EDIT_FIELDS}
    values = {key: st.session_state[key] for key in keys.values() if key in st.session_state}
    if all(_stripped(values[key]) == edit_shown_value(shown, field) for field, key in keys.items() if key in values):
        return {}
    return {PATIENT_ID_KEY: patient_id, EDIT_BASE_KEY: base, EDIT_REOPEN_KEY: patient_id, **values}


def _stripped(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def draft_restored(page: str) -> bool:
    """Whether a draft of ``page`` was just given back (True once: the page says so, then forgets)."""
    pages = st.session_state.get(DRAFT_RESTORED_KEY)
    if not pages or page not in pages:
        return False
    st.session_state[DRAFT_RESTORED_KEY] = pages - {page}
    return True


def current_session() -> AuthSession | None:
    auth = st.session_state.get(AUTH_KEY)
    return auth if isinstance(auth, AuthSession) else None


def sign_in(auth: AuthSession) -> None:
    st.session_state[AUTH_KEY] = auth
    # The typed password must not outlive the sign-in.
    for key in (NOTE_KEY, "login_password"):
        st.session_state.pop(key, None)
    draft = st.session_state.pop(DRAFT_KEY, None)
    # A stale draft is gone already: every signed-out run drops it first (drop_stale_draft).
    if isinstance(draft, Draft) and draft.owner == auth.email.lower() and auth.role in PATIENT_ROLES:
        for key, value in draft.values.items():
            st.session_state[key] = value
        st.session_state[DRAFT_RESTORED_KEY] = draft.pages
        st.session_state[DRAFT_OPEN_KEY] = REGISTER_PAGE if REGISTER_PAGE in draft.pages else PATIENTS_PAGE
    # Anyone else signing in on this browser never sees it: it is dropped above.


def sign_out(note: str | None = None, *, revoke: bool = False, keep_draft: bool = False) -> None:
    """Forget the token and everything derived from it in this session.

    ``revoke`` (the Sign out button) also gives the token up at auth first, so a copy of it
    cannot be used any more; if the gateway cannot be reached the local sign-out still happens
    and the token simply expires. ``keep_draft`` (an expired session, not a sign-out) keeps what
    the user had submitted in the Register form or a patient's Edit form, and a registration whose
    possible duplicates are still to be decided, for the same user's next sign-in (:func:`sign_in`).
    """
    auth = current_session()
    draft = None
    if keep_draft and auth is not None:
        undecided = undecided_duplicate()
        registering = {**_register_draft(), **({REGISTER_RESULT_KEY: undecided} if undecided else {})}
        editing = _edit_draft()
        pages = frozenset(page for page, kept in ((REGISTER_PAGE, registering), (PATIENTS_PAGE, editing)) if kept)
        if pages:
            draft = Draft(owner=auth.email.lower(), values={**registering, **editing}, pages=pages,
                          kept_at=time.time())
    if revoke and auth is not None and not auth.expired:
        try:
            GatewayClient(gateway_url(), auth.token).logout()
        except GatewayError:
            pass  # already invalid, or the gateway is away: nothing more this page can do
    for key in list(st.session_state.keys()):
        if key not in (GATEWAY_KEY,):
            del st.session_state[key]
    if note:
        st.session_state[NOTE_KEY] = note
    if draft is not None:
        st.session_state[DRAFT_KEY] = draft


def expire_session() -> None:
    """Send the user back to login with a note (token expired or revoked), keeping their form draft."""
    sign_out(SESSION_EXPIRED_NOTE, keep_draft=True)
    st.rerun()


def require_session() -> AuthSession:
    """The signed-in user; a missing or locally expired token goes back to login."""
    auth = current_session()
    if auth is None or auth.expired:
        expire_session()
    assert auth is not None
    return auth


def client() -> GatewayClient:
    auth = current_session()
    return GatewayClient(gateway_url(), auth.token if auth else None)


def has_role(*roles: str) -> bool:
    auth = current_session()
    return auth is not None and auth.role in roles


# --- formatting -------------------------------------------------------------------------------


def fmt_int(value: Any) -> str:
    """``12345`` -> ``12,345``; missing -> an em dash."""
    if value is None:
        return "—"
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return str(value)


def plural(count: Any, noun: str, nouns: str | None = None) -> str:
    """``1 account``, ``2 accounts``, ``12,345 patients``."""
    return f"{fmt_int(count)} {noun if count == 1 else (nouns or noun + 's')}"


def parse_dt(value: Any) -> datetime | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def fmt_date(value: Any) -> str:
    if not value:
        return "—"
    if isinstance(value, date) and not isinstance(value, datetime):
        return value.isoformat()
    parsed = parse_dt(value)
    return parsed.strftime("%Y-%m-%d %H:%M UTC") if parsed and "T" in str(value) else str(value)


def today_in(timezone: str | None, *, now: datetime | None = None) -> date:
    """Today's date in the IANA ``timezone`` (the browser's), or in UTC when it is unknown or invalid."""
    moment = now or datetime.now(UTC)
    try:
        return moment.astimezone(ZoneInfo(timezone)).date() if timezone else moment.astimezone(UTC).date()
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a directory or too long a name
        return moment.astimezone(UTC).date()


#: Bounds of every date field: as wide as the browser's calendar handles. A typed date outside a field's
#: bounds is not refused but replaced, without a word, by the last valid one (a future birth date saved
#: the one typed before), and a stored date outside them stops the page; the server checks dates and its
#: reason appears under the field.
DATE_BOUNDS: dict[str, date] = {"min_value": date(1000, 1, 1), "max_value": date(9999, 12, 31)}


def browser_today() -> date:
    """The user's today, for date pickers: the server's date is yesterday all morning for a clinic ahead of it.

    The patient service accepts any date some time zone has reached (UTC+14), so the user's own
    today is always accepted.
    """
    return today_in(st.context.timezone)


def fmt_ago(value: Any, *, now: datetime | None = None) -> str:
    """``2 s ago``, ``5 min ago``, ``3 h ago``; unknown -> ``never``."""
    parsed = parse_dt(value)
    if parsed is None:
        return "never"
    seconds = max(0.0, ((now or datetime.now(UTC)) - parsed).total_seconds())
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 86400:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"


def fmt_seconds(value: Any) -> str:
    if value is None:
        return "—"
    seconds = float(value)
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:,.1f} s"


def field_error(errors: dict[str, str], *names: str) -> None:
    """Show the server's reason for a field right under that field."""
    for name in names:
        if name in errors:
            st.error(md_text(errors[name]), icon=":material/error:")
            return


def show_other_errors(errors: dict[str, str], known: set[str]) -> None:
    """Show the server's reasons that belong to no field of the form (``known``), under the form's fields."""
    for name, reason in errors.items():
        if name not in known:
            st.error(md_text(reason), icon=":material/error:")


def empty_state(title: str, hint: str, icon: str = ":material/inbox:") -> None:
    """A friendly "nothing here yet" box instead of an empty table."""
    st.info(f"**{title}**  \n{hint}", icon=icon)


def error_banner(exc: GatewayError, where: Any = st) -> None:
    """The banner for a failed call, the same wherever it is caught (the app around a page, or a fragment
    that re-runs on its own timer outside the app's handling). Sign-in expiry is not shown here: callers
    send the user back to sign in instead."""
    if isinstance(exc, GatewayUnavailable):
        where.error(f"**The platform is not reachable right now.** {md_text(exc.message)} "
                    "Your work on this page is kept; try again in a moment.", icon=":material/cloud_off:")
    elif isinstance(exc, PermissionDenied):
        # The UI hides what a role may not do; this is the server refusing anyway (a role changed mid-session).
        where.error("**Your role does not allow this.** Ask an administrator if you need access.",
                    icon=":material/block:")
    elif isinstance(exc, ServerError):
        where.error("**The server could not complete this request.** Try again, and tell your administrator "
                    "if it keeps happening.", icon=":material/error:")
    else:
        where.error(f"**The request failed.** {md_text(exc.message)}", icon=":material/error:")
