"""Formatting helpers: thousands separators, plurals, relative times; never a crash on odd input."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

import pytest

from dashboard import ui

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("value", "text"), [(0, "0"), (1234567, "1,234,567"), (None, "—"), ("12", "12"),
                                              ("n/a", "n/a")])
def test_fmt_int(value: object, text: str) -> None:
    assert ui.fmt_int(value) == text


def test_plural() -> None:
    assert ui.plural(1, "account") == "1 account"
    assert ui.plural(0, "account") == "0 accounts"
    assert ui.plural(12345, "patient") == "12,345 patients"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ((NOW - timedelta(seconds=2)).isoformat(), "2 s ago"),
        ((NOW - timedelta(minutes=5)).isoformat().replace("+00:00", "Z"), "5 min ago"),
        ((NOW - timedelta(hours=3)).isoformat(), "3 h ago"),
        ((NOW - timedelta(days=2)).isoformat(), "2 d ago"),
        ((NOW + timedelta(seconds=3)).isoformat(), "0 s ago"),  # a clock slightly ahead is not "in the future"
        (None, "never"),
        ("not a time", "never"),
    ],
)
def test_fmt_ago(value: object, text: str) -> None:
    assert ui.fmt_ago(value, now=NOW) == text


def test_fmt_date_and_seconds() -> None:
    assert ui.fmt_date("2026-11-26T07:53:00Z") == "2026-11-26 07:53 UTC"
    assert ui.fmt_date("1980-05-17") == "1980-05-17"
    assert ui.fmt_date(None) == "—"
    assert ui.fmt_seconds(0.25) == "250 ms"
    assert ui.fmt_seconds(12.34) == "12.3 s"


@pytest.mark.parametrize(
    ("timezone", "expected"),
    [
        ("Pacific/Auckland", date(2026, 11, 27)),  # 09:30 on the 27th there, 20:30 on the 26th in UTC
        ("Europe/Oslo", date(2026, 11, 26)),
        ("America/Los_Angeles", date(2026, 11, 26)),
        ("Pacific/Kiritimati", date(2026, 11, 27)),  # UTC+14: the latest date the patient service accepts
        (None, date(2026, 11, 26)),  # unknown: UTC
        ("Not/AZone", date(2026, 11, 26)),
        ("../../etc/passwd", date(2026, 11, 26)),
        ("America", date(2026, 11, 26)),  # a directory of zones
        ("x" * 5000, date(2026, 11, 26)),
    ],
)
def test_the_date_pickers_today_is_the_browsers(timezone: str | None, expected: date) -> None:
    """A clinic ahead of the server could not pick its own today as a registration date all morning."""
    assert ui.today_in(timezone, now=datetime(2026, 11, 26, 20, 30, tzinfo=UTC)) == expected


@pytest.mark.parametrize("text", [
    "Eve [verify](https://evil.example)", "![p](http://127.0.0.1:9/t.png)", "**Bold** _it_ `code` ~~s~~",
    ":red[Call 555]", ":material/home:", "$x^2$ City", "<b>hi</b> &amp;", "# Heading", "1. list", "- item",
    "www.evil.com", "O'Brien-Smith Jr.", "a\\b", "_http://evil.example/x", "x_https://evil.example",
    "_www.evil.example",
])
def test_stored_text_is_shown_literally_in_markdown(text: str) -> None:
    """Checked against what Chromium rendered for these (scratch run, session 8): no link, image,
    colour, icon, formula or HTML, only the text. Here: every Markdown character is escaped and each
    link or directive start is broken, and removing both gives the text back."""
    shown = ui.md_text(text)
    # Every link or directive start is broken by the joiner (escaping alone does not stop GFM's autolinks).
    starts = re.findall(r"(?i)(?:https?|www)(\u2060?)\\[:.]|\\:(\u2060?)(?:material|red)", shown)
    assert len(starts) == len(re.findall(r"(?i)https?:|www\.|:material|:red", text)), shown
    assert all("\u2060" in "".join(found) for found in starts), shown
    assert not re.search(r"(?<!\\)[*_`\[\]()!<>$#~|]", shown), shown
    assert re.sub(r"\\(.)", r"\1", shown).replace("\u2060", "") == text
