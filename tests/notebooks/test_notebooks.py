"""Every notebook runs headless in a real kernel over known analytics rows and reports the right numbers.

The expected figures are computed here in plain Python from the synthetic patients, not with
the notebooks' SQL or Polars, so a wrong query or a wrong grouping fails the test.
(test_acceptance.py runs the same notebooks over data produced by the real services.)
"""

from __future__ import annotations

from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from nbclient.exceptions import CellExecutionError
from sqlalchemy import Engine, text

from pms import notebook as pms_notebook
from tests.fixtures.servers import ServerSet

pytestmark = [pytest.mark.integration, pytest.mark.slow]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def run(name: str, servers: ServerSet, **parameters: Any) -> dict[str, Any]:
    path = pms_notebook.NOTEBOOK_DIR / f"{name}.ipynb"
    notebook, report = pms_notebook.execute(path, servers.settings, parameters=parameters)
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == []
    assert report is not None and report["notebook"] == name
    # The chart cells rendered Altair (Vega-Lite) charts.
    charts = [o for c in notebook.cells for o in c.get("outputs", [])
              if "vegaEmbed" in str(o.get("data", {}).get("text/html", ""))]
    assert charts, f"{name} rendered no chart"
    return report


def test_registrations_over_a_range_by_month(servers: ServerSet, synthetic: dict[str, Any]) -> None:
    start, end = date(2026, 3, 1), date(2026, 6, 30)
    facts = synthetic["patient_facts"]
    registered = [f["registered_date"] for f in facts if start <= f["registered_date"] <= end]
    removed = [f["removed_on"] for f in facts if f["removed_on"] and start <= f["removed_on"] <= end]
    per_month = Counter(d.replace(day=1).isoformat() for d in registered)
    for month in (3, 4, 5, 6):  # every period of the range is listed, zero when nobody registered
        per_month.setdefault(date(2026, month, 1).isoformat(), 0)
    by_weekday = Counter(d.weekday() for d in registered)
    busiest = WEEKDAYS[min(by_weekday, key=lambda w: (-by_weekday[w], w))]
    active_days = set(registered) | set(removed)

    report = run("registrations", servers, start=start.isoformat(), end=end.isoformat(), granularity="month")

    assert report["total_registrations"] == len(registered)
    assert report["total_removals"] == len(removed)
    assert report["net"] == len(registered) - len(removed)
    assert report["periods"] == dict(per_month)
    assert report["busiest_weekday"] == busiest
    assert report["first_day"] == min(active_days).isoformat()
    assert report["last_day"] == max(active_days).isoformat()


def test_registrations_rejects_an_unknown_granularity(servers: ServerSet, synthetic: dict[str, Any]) -> None:
    with pytest.raises(CellExecutionError, match="granularity must be one of"):
        pms_notebook.execute(pms_notebook.NOTEBOOK_DIR / "registrations.ipynb", servers.settings,
                             parameters={"granularity": "fortnight"})


def band(birth_year: int | None) -> str:
    if birth_year is None or birth_year > 2026:
        return "unknown"
    age = 2026 - birth_year
    return "0-17" if age < 18 else "18-39" if age < 40 else "40-64" if age < 65 else "65+"


def test_demographics(servers: ServerSet, synthetic: dict[str, Any]) -> None:
    active = [f for f in synthetic["patient_facts"] if f["active"]]
    bands = Counter(band(f["birth_year"]) for f in active)
    cities = Counter("unknown" if f["city"] == "" else f["city"] for f in active)
    genders = Counter(f["gender"] for f in active)

    report = run("demographics", servers, as_of_year=2026, age_bands=[0, 40, 18, 65], top_cities=3,
                 period="month")

    assert report["active_patients"] == len(active)
    assert report["by_gender"] == {g: genders.get(g, 0) for g in ("female", "male", "other", "unknown")}
    assert report["age_bands"] == dict(bands)
    assert report["unknown_age"] == bands["unknown"]
    assert report["cities"] == dict(cities)
    top = sorted(cities.items(), key=lambda item: (-item[1], item[0]))
    assert report["top_cities"] == dict(top[:3])
    assert report["other_cities"] == sum(n for _, n in top[3:])
    assert report["new_patients_in_range"] == len(active)


def test_data_quality_catches_an_aggregate_that_drifted(servers: ServerSet, synthetic: dict[str, Any],
                                                        analytics_engine: Engine) -> None:
    city = next(row["city"] for row in synthetic["geography"] if row["city"])
    with analytics_engine.begin() as conn:
        conn.execute(text("UPDATE geography SET patients = patients + 1 WHERE city = :c"), {"c": city})
    try:
        report = run("data_quality", servers, freshness_slo_s=0.1)
    finally:
        with analytics_engine.begin() as conn:
            conn.execute(text("UPDATE geography SET patients = patients - 1 WHERE city = :c"), {"c": city})
    # Exactly the two geography checks fail; every other check holds on the factory's consistent rows.
    failing = {name for name, ok in report["checks"].items() if not ok}
    assert failing == {"geography_sum_equals_active_facts", "geography_cells_match_facts"}
    assert len(report["checks"]) >= 8
    assert report["all_checks_pass"] is False
    assert report["active_patients"] == sum(f["active"] for f in synthetic["patient_facts"])
    assert report["dead_letters"] == report["dead_letters_counter"] == 2
    assert report["lag_messages"] == 0
    assert report["freshness_ok"] is False  # p99 180 ms > the 100 ms objective given


def test_notebooks_have_nothing_left_behind(tmp_path: Path) -> None:
    """Running notebooks through the helper never writes outputs back into notebooks/."""
    from tests.tools.check_notebooks_clean import dirty_notebooks

    assert dirty_notebooks(pms_notebook.NOTEBOOK_DIR) == []
