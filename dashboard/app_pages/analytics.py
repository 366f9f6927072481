"""KPI tiles, registrations over time, demographics pyramid, top cities, freshness badge."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import streamlit as st

from dashboard import charts, ui
from dashboard.client import GatewayError, GatewayUnavailable, InvalidInput, NotAuthenticated, cached_analytics

REFRESH_S = 10
GRANULARITIES = ("day", "week", "month")


def _pick(body: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if body.get(key) is not None:
            return body[key]
    return None


auth = ui.require_session()
title_col, refresh_col = st.columns([4, 1])
title_col.title(":material/monitoring: Analytics")
auto = refresh_col.toggle(f"Auto-refresh ({REFRESH_S} s)", key="analytics_auto",
                          help="Reload the figures every few seconds while this page is open.")


def _view(name: str, **params: Any) -> dict[str, Any]:
    return cached_analytics(ui.gateway_url(), auth.token, name, tuple(sorted(params.items())))


def _threshold(body: dict[str, Any]) -> str:
    """The privacy threshold a view applied, for saying why something is hidden."""
    suppression = body.get("suppression")
    return str(suppression.get("threshold")) if isinstance(suppression, dict) and suppression.get("threshold") \
        else "a few"


def _tile(column: Any, label: str, body: dict[str, Any], *keys: str) -> None:
    value, suppressed = charts.count_value(_pick(body, *keys))
    column.metric(label, "Suppressed" if suppressed else ui.fmt_int(value), border=True,
                  help="Hidden for privacy: a small count could identify a person." if suppressed else None)


@st.fragment(run_every=REFRESH_S if auto else None)
def kpis() -> None:
    """Tiles and freshness; re-run alone on the auto-refresh timer.

    A timer re-run happens outside the app's error handling (only the fragment runs), so this
    handles an expired session and an unreachable gateway itself.
    """
    try:
        _kpis()
    except NotAuthenticated:
        ui.expire_session()
    except GatewayUnavailable as exc:
        st.warning(f"**Live figures paused.** {ui.md_text(exc.message)} They come back by themselves.",
                   icon=":material/cloud_off:")
    except GatewayError as exc:
        # Anything else (a 500, a 403 after a role change, a 429) would surface as Streamlit's own
        # exception box: the app's handlers never see what a fragment raises.
        ui.error_banner(exc)


def _kpis() -> None:
    summary = _view("summary")
    freshness = _view("freshness")
    tiles = st.columns(4)
    _tile(tiles[0], "Active patients", summary, "activePatients", "active")
    _tile(tiles[1], "New today", summary, "newToday", "today")
    _tile(tiles[2], "New in 7 days", summary, "new7d", "new7Days", "newLast7Days")
    _tile(tiles[3], "New in 30 days", summary, "new30d", "new30Days", "newLast30Days")
    as_of = _pick(freshness, "asOf") or _pick(summary, "asOf")
    lag = _pick(freshness, "lagMessages", "lag")
    p99 = _pick(freshness, "p99Ms", "freshnessP99Ms")
    last_event = _pick(freshness, "lastEventAt", "lastCommitAt") or _pick(summary, "lastEventAt")
    pipeline = freshness.get("pipeline") or summary.get("pipeline") or {}
    parts = [f"as of {ui.fmt_ago(as_of)}", f"last event {ui.fmt_ago(last_event)}"]
    if pipeline.get("running") is False:
        # Lag and p99 keep the values of the pipeline's last batch: shown, they would read as current.
        parts.insert(0, f"Analytics pipeline not running (last heartbeat {ui.fmt_ago(pipeline.get('heartbeatAt'))})")
        st.badge(" · ".join(parts), icon=":material/error:", color="red")
        st.caption(":material/warning: New registrations and changes are not counted until it runs again; "
                   "nothing is lost, it catches up by itself.")
    else:
        stale = lag not in (None, 0)
        if lag is not None:
            parts.append(f"lag {ui.fmt_int(lag)} events")
        if p99 is not None:
            parts.append(f"p99 freshness {float(p99):,.0f} ms")
        st.badge(" · ".join(parts), icon=":material/schedule:" if stale else ":material/bolt:",
                 color="orange" if stale else "green")
    suppression = summary.get("suppression") or {}
    if suppression.get("applied"):
        st.caption(f":material/visibility_off: Counts below {suppression.get('threshold')} are suppressed "
                   "for your role (small-count suppression).")


kpis()
st.divider()

reg_col, controls = st.columns([3, 1])
with controls:
    today = ui.today_in(None)  # UTC: the analytics API counts UTC days
    period = st.date_input("Date range", value=(today - timedelta(days=90), today), **ui.DATE_BOUNDS,
                           key="analytics_range", format="YYYY-MM-DD")
    granularity = st.segmented_control("Granularity", GRANULARITIES, default="week", key="analytics_gran") or "week"
with reg_col:
    st.subheader("Registrations over time")
    start, end = (period[0], period[-1]) if isinstance(period, tuple) and period else (today - timedelta(90), today)
    body: dict[str, Any] | None = None
    try:
        body = _view("registrations", **{"from": start.isoformat(), "to": end.isoformat(), "granularity": granularity})
    except InvalidInput as exc:
        # E.g. a range the picker allows but the API refuses at this granularity (over 3,700 buckets):
        # say why, and keep the rest of the page.
        reasons = ui.md_text("; ".join(exc.errors.values()) or exc.message)
        st.warning(f"**This range cannot be shown.** {reasons}. Choose a shorter range or a coarser granularity.",
                   icon=":material/date_range:")
    if body is not None:
        registrations = charts.registrations_frame(body)
        moved = int(registrations["registrations"].sum()) + int(registrations["removals"].sum())
        if registrations.is_empty() or (moved == 0 and not registrations["suppressed"].any()):
            ui.empty_state("No registrations in this period.", "Widen the date range.", icon=":material/event_busy:")
        else:
            st.altair_chart(charts.registrations_chart(registrations), width="stretch")
            hidden = int(registrations["suppressed"].sum())
            # The API's totals, not a sum of the shown periods: for a caller who sees suppressed periods that
            # sum is not the period's total, and the API hides the total when it would reveal a hidden period.
            regs, regs_hidden = charts.count_value(body.get("totalRegistrations"))
            removals, removals_hidden = charts.count_value(body.get("totalRemovals"))
            st.caption(("Registrations suppressed" if regs_hidden else ui.plural(regs, "registration")) + ", "
                       + ("removals suppressed" if removals_hidden else ui.plural(removals, "removal"))
                       + " in the period" + (f" · {hidden} period(s) suppressed for privacy" if hidden else ""))

demo_col, geo_col = st.columns(2)
with demo_col:
    st.subheader("Age and gender")
    demographics_body = _view("demographics")
    demographics = charts.demographics_frame(demographics_body)
    if demographics.is_empty():
        ui.empty_state("No demographic data yet.", "It appears once patients are registered.",
                       icon=":material/bar_chart_off:")
    elif bool(demographics["suppressed"].all()):
        ui.empty_state("Every age and gender group is too small to show.",
                       f"Groups of fewer than {_threshold(demographics_body)} patients are hidden for privacy.",
                       icon=":material/visibility_off:")
    else:
        st.altair_chart(charts.pyramid_chart(demographics), width="stretch")
        hidden = int(demographics["suppressed"].sum())
        if hidden:
            st.caption(f":material/visibility_off: {hidden} small cell(s) suppressed for privacy.")
with geo_col:
    st.subheader("Top cities")
    geography_body = _view("geography", top=10)
    geography = charts.geography_frame(geography_body)
    # The API may leave the small cities out and count their patients in "other".
    other, other_hidden = charts.count_value(geography_body.get("other"))
    if bool(geography["suppressed"].all()) and (other or other_hidden or not geography.is_empty()):
        ui.empty_state("Every city is too small to show.",
                       f"Cities with fewer than {_threshold(geography_body)} patients are hidden for privacy"
                       + (f" ({ui.plural(other, 'patient')} in them)." if other else "."),
                       icon=":material/visibility_off:")
    elif geography.is_empty():
        ui.empty_state("No city data yet.", "It appears once patients are registered.",
                       icon=":material/location_off:")
    else:
        st.altair_chart(charts.cities_chart(geography), width="stretch")
        hidden = int(geography["suppressed"].sum())
        if hidden:
            st.caption(f":material/visibility_off: {hidden} city count(s) suppressed for privacy.")

billing = charts.rows(_view("billing"))
if billing:
    parts = []
    for row in billing:
        value, suppressed = charts.count_value({"value": row.get("patients"), "suppressed": row.get("suppressed")})
        status = row.get("billingStatus") or "unknown"
        parts.append(f"**{ui.md_text(status)}** {'suppressed' if suppressed else ui.fmt_int(value)}")
    st.caption(":material/receipt_long: Billing accounts of active patients: " + " · ".join(parts))
