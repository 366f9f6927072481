"""The notebooks on an analytics database with nothing in it: what an analyst opens before the pipeline has
committed anything, or on a range with no rows. Every column of an empty result used to have Polars' Null
type, which date truncation and Altair refuse (three notebooks crashed)."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from pms import notebook as pms_notebook
from tests.fixtures.servers import ServerSet

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize(("name", "parameters"), [
    ("registrations", {}),
    ("registrations", {"start": "2010-01-01", "end": "2010-12-31", "granularity": "month"}),
    ("demographics", {}),
    ("data_quality", {}),
])
def test_every_notebook_runs_on_empty_analytics(servers: ServerSet, analytics_engine: Engine, name: str,
                                               parameters: dict[str, str]) -> None:
    path = pms_notebook.NOTEBOOK_DIR / f"{name}.ipynb"
    notebook, report = pms_notebook.execute(path, servers.settings, parameters=parameters or None)
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == []
    assert report is not None and report["notebook"] == name
    if name == "registrations":
        assert report["total_registrations"] == 0 and report["total_removals"] == 0
    elif name == "demographics":
        assert report["active_patients"] == 0 and report["top_cities"] == {}
    else:
        assert report["all_checks_pass"] is True and report["events_processed"] == 0
