"""Analytics answers -> Polars frames -> Altair charts (pure functions, tested without Streamlit).

The analytics API answers JSON objects that carry ``asOf`` and a list of rows; a row whose
count was suppressed for privacy (small-count suppression) comes with ``suppressed: true``
and no count. These helpers accept the few spellings the API may use for the row list and
the count so the pages do not break on a renamed key, and they never invent a number for a
suppressed cell: it is drawn as missing and listed as suppressed.
"""

from __future__ import annotations

from typing import Any

import altair as alt
import polars as pl

_ROW_KEYS = ("items", "points", "series", "cells", "buckets", "cities", "rows", "data")
_COUNT_KEYS = ("patients", "count", "value", "total")


def rows(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The list of rows inside an analytics answer (whatever the key is called)."""
    for key in _ROW_KEYS:
        value = body.get(key)
        if isinstance(value, list):
            return [r for r in value if isinstance(r, dict)]
    for value in body.values():
        if isinstance(value, list) and all(isinstance(r, dict) for r in value):
            return list(value)
    return []


def _count(row: dict[str, Any], keys: tuple[str, ...] = _COUNT_KEYS) -> int | None:
    if row.get("suppressed"):
        return None
    for key in keys:
        if row.get(key) is not None:
            return int(row[key])
    return None


def count_value(value: Any) -> tuple[int | None, bool]:
    """``(count, suppressed)`` from a plain number or the API's ``{"value", "suppressed"}`` object."""
    if isinstance(value, dict):
        suppressed = bool(value.get("suppressed"))
        raw = value.get("value")
        return (None if suppressed or raw is None else int(raw)), suppressed
    return (None if value is None else int(value)), False


def registrations_frame(body: dict[str, Any]) -> pl.DataFrame:
    """Columns ``period`` (date), ``registrations``, ``removals`` (null when suppressed), ``suppressed``."""

    def _n(row: dict[str, Any], key: str) -> int | None:
        if row.get(f"{key}Suppressed"):
            return None
        value = row.get(key)
        return int(value) if value is not None else (0 if key == "removals" else int(row.get("count") or 0))

    data = [
        {
            "period": str(r.get("period") or r.get("day") or r.get("date") or r.get("bucket") or r.get("start")),
            "registrations": _n(r, "registrations"),
            "removals": _n(r, "removals"),
            "suppressed": bool(r.get("registrationsSuppressed") or r.get("removalsSuppressed")),
        }
        for r in rows(body)
    ]
    frame = pl.DataFrame(data, schema={"period": pl.String, "registrations": pl.Int64, "removals": pl.Int64,
                                       "suppressed": pl.Boolean})
    return frame.with_columns(pl.col("period").str.slice(0, 10).str.to_date(strict=False)).sort("period")


def demographics_frame(body: dict[str, Any]) -> pl.DataFrame:
    """Columns ``age_band``, ``gender``, ``patients`` (null when suppressed), ``suppressed``."""
    data = [
        {
            "age_band": str(r.get("ageBand") or r.get("age_band") or r.get("band") or "unknown"),
            "gender": str(r.get("gender") or "unknown"),
            "patients": _count(r),
            "suppressed": bool(r.get("suppressed")),
        }
        for r in rows(body)
    ]
    return pl.DataFrame(
        data, schema={"age_band": pl.String, "gender": pl.String, "patients": pl.Int64, "suppressed": pl.Boolean}
    )


def geography_frame(body: dict[str, Any]) -> pl.DataFrame:
    """Columns ``city``, ``patients`` (null when suppressed), ``suppressed``; largest first."""
    data = [
        {"city": str(r.get("city") or "Unknown") or "Unknown", "patients": _count(r),
         "suppressed": bool(r.get("suppressed"))}
        for r in rows(body)
    ]
    frame = pl.DataFrame(data, schema={"city": pl.String, "patients": pl.Int64, "suppressed": pl.Boolean})
    return frame.sort("patients", descending=True, nulls_last=True)


def registrations_chart(frame: pl.DataFrame) -> alt.Chart:
    long = frame.unpivot(index="period", on=["registrations", "removals"], variable_name="kind",
                         value_name="patients").drop_nulls("patients")
    return (
        alt.Chart(long)
        .mark_bar()
        .encode(
            x=alt.X("period:T", title=None),
            y=alt.Y("patients:Q", title="Patients", axis=alt.Axis(format=",d", tickMinStep=1)),
            color=alt.Color("kind:N", title=None, scale=alt.Scale(range=["#2563eb", "#dc2626"])),
            xOffset="kind:N",
            tooltip=[alt.Tooltip("period:T", title="Period"), alt.Tooltip("kind:N", title=""),
                     alt.Tooltip("patients:Q", format=",d")],
        )
        .properties(height=280)
    )


def _band_order(band: str) -> int:
    digits = "".join(ch if ch.isdigit() else " " for ch in band).split()
    return int(digits[0]) if digits else 10_000


def pyramid_chart(frame: pl.DataFrame) -> alt.Chart:
    """Population pyramid: age bands down the middle, women to the right, men to the left."""
    bands = sorted(frame["age_band"].unique().to_list(), key=_band_order, reverse=True)
    plot = frame.filter(pl.col("patients").is_not_null()).with_columns(
        pl.when(pl.col("gender") == "male").then(-pl.col("patients")).otherwise(pl.col("patients")).alias("signed")
    )
    return (
        alt.Chart(plot)
        .mark_bar()
        .encode(
            y=alt.Y("age_band:N", sort=bands, title="Age band"),
            x=alt.X("signed:Q", title="Patients (men ← → women, others stacked right)",
                    axis=alt.Axis(labelExpr="abs(datum.value)", tickMinStep=1)),
            color=alt.Color("gender:N", title="Gender"),
            tooltip=["age_band:N", "gender:N", alt.Tooltip("patients:Q", format=",d")],
        )
        .properties(height=320)
    )


def cities_chart(frame: pl.DataFrame) -> alt.Chart:
    plot = frame.filter(pl.col("patients").is_not_null())
    return (
        alt.Chart(plot)
        .mark_bar(color="#0d9488")
        .encode(
            y=alt.Y("city:N", sort="-x", title=None),
            x=alt.X("patients:Q", title="Active patients", axis=alt.Axis(format=",d", tickMinStep=1)),
            tooltip=["city:N", alt.Tooltip("patients:Q", format=",d")],
        )
        .properties(height=320)
    )
