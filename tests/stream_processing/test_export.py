"""`pms export`: analytics tables -> Parquet/CSV, chunked, consistent, with clear errors."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr
from rich.console import Console
from sqlalchemy import Engine

from pms import errors
from pms.settings import to_env
from stream_processing import export
from tests.fixtures.servers import ServerSet
from tests.notebooks import factories

pytestmark = pytest.mark.integration
QUIET = Console(file=io.StringIO())


@pytest.fixture
def loaded(analytics: Engine) -> dict[str, Any]:
    """The analytics database holding 120 synthetic patients (5 deleted) and 3 dead letters."""
    rows = factories.analytics_rows(patients=120, deleted=5, seed=11)
    factories.load(analytics, rows, dead_letters=3)
    return rows


def test_parquet_export_writes_every_table_exactly(servers: ServerSet, loaded: dict[str, Any],
                                                  tmp_path: Path) -> None:
    written = export.run(servers.settings, fmt="parquet", tables=None, out_dir=tmp_path, console=QUIET)
    assert [w.table for w in written] == export.exportable_tables()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{t}.parquet" for t in export.exportable_tables())
    counts = {w.table: w.rows for w in written}
    assert counts["patient_facts"] == 120
    assert counts["dead_letters"] == 3
    assert counts["pipeline_status"] == 1

    facts = pl.read_parquet(tmp_path / "patient_facts.parquet")
    assert facts.schema["patient_id"] == pl.String
    assert facts.schema["last_event_at"] == pl.Datetime("us", "UTC")
    assert facts.schema["birth_date"] == pl.Date
    expected = sorted(loaded["patient_facts"], key=lambda f: str(f["patient_id"]))
    assert facts["patient_id"].to_list() == [str(f["patient_id"]) for f in expected]  # ordered by key
    assert facts["birth_year"].to_list() == [f["birth_year"] for f in expected]
    assert facts["removed_on"].to_list() == [f["removed_on"] for f in expected]

    demographics = pl.read_parquet(tmp_path / "demographics.parquet")
    assert int(demographics["patients"].sum()) == 115 == facts.filter(pl.col("active")).height
    dead = pl.read_parquet(tmp_path / "dead_letters.parquet")
    # The raw bytes of a bad message may hold a name or an email: never exported, the rest is.
    assert dead.columns == ["id", "topic", "partition", "kafka_offset", "reason", "raw_digest", "received_at"]
    assert dead.sort("kafka_offset")["raw_digest"].to_list() == [factories.dead_letter(i)["raw_digest"]
                                                                 for i in range(3)]


def test_csv_export_round_trips(servers: ServerSet, loaded: dict[str, Any], tmp_path: Path) -> None:
    written = export.run(servers.settings, fmt="csv", tables=["geography", "dead_letters", "patient_facts"],
                         out_dir=tmp_path, console=QUIET)
    assert [(w.table, w.path.name) for w in written] == [
        ("geography", "geography.csv"), ("dead_letters", "dead_letters.csv"), ("patient_facts", "patient_facts.csv")]
    geography = pl.read_csv(tmp_path / "geography.csv", schema_overrides={"city": pl.String})
    expected = {row["city"]: row["patients"] for row in loaded["geography"]}
    # The unknown city is the empty string in the table; CSV writes it as an empty field.
    assert {(c or ""): n for c, n in geography.iter_rows()} == expected
    dead = pl.read_csv(tmp_path / "dead_letters.csv")
    assert "raw" not in dead.columns
    assert sorted(dead["reason"]) == sorted(factories.dead_letter(i)["reason"] for i in range(3))
    raw_hex = {factories.dead_letter(i)["raw"].hex() for i in range(3)}
    assert not any(h in (tmp_path / "dead_letters.csv").read_text() for h in raw_hex)
    facts = pl.read_csv(tmp_path / "patient_facts.csv", try_parse_dates=True)
    assert facts.height == 120
    assert facts.columns == [c for c in factories.analytics_models.patient_facts.columns.keys()]  # noqa: SIM118


def test_big_tables_are_streamed_in_chunks(servers: ServerSet, loaded: dict[str, Any], tmp_path: Path) -> None:
    """Each chunk is appended on its own: the file has one row group per chunk, the same rows."""
    small = export.run(servers.settings, fmt="parquet", tables=["patient_facts"], out_dir=tmp_path / "small",
                       chunk_rows=7, console=QUIET)
    whole = export.run(servers.settings, fmt="parquet", tables=["patient_facts"], out_dir=tmp_path / "whole",
                       console=QUIET)
    assert pq.ParquetFile(small[0].path).num_row_groups == math.ceil(120 / 7)
    assert pq.ParquetFile(whole[0].path).num_row_groups == 1
    assert pl.read_parquet(small[0].path).equals(pl.read_parquet(whole[0].path))
    csv_small = export.run(servers.settings, fmt="csv", tables=["patient_facts"], out_dir=tmp_path / "csv",
                           chunk_rows=7, console=QUIET)
    text = csv_small[0].path.read_text()
    assert text.count("patient_id") == 1  # one header, however many chunks
    assert len(text.splitlines()) == 121


def test_empty_tables_keep_their_columns(servers: ServerSet, analytics: Engine, tmp_path: Path) -> None:
    written = export.run(servers.settings, fmt="parquet", tables=["geography", "dead_letters"], out_dir=tmp_path,
                         console=QUIET)
    assert [w.rows for w in written] == [0, 0]
    assert pl.read_parquet(tmp_path / "geography.parquet").schema == pl.Schema(
        {"city": pl.String, "patients": pl.Int32})
    export.run(servers.settings, fmt="csv", tables=["geography"], out_dir=tmp_path, console=QUIET)
    assert (tmp_path / "geography.csv").read_text() == "city,patients\n"


def test_raw_dead_letter_bytes_stay_out_even_for_a_login_that_could_read_them(
        servers: ServerSet, loaded: dict[str, Any], tmp_path: Path) -> None:
    """Defence in depth: an analyst URL pointing at the owner role still exports no raw bytes."""
    owner = servers.make_settings(analyst_database_url=SecretStr(
        servers.settings.database_url_for("analytics").render_as_string(hide_password=False)))
    for fmt in ("parquet", "csv"):
        written = export.run(owner, fmt=fmt, tables=["dead_letters"], out_dir=tmp_path / fmt, console=QUIET)
        assert written[0].rows == 3
        path = written[0].path
        frame = pl.read_parquet(path) if fmt == "parquet" else pl.read_csv(path)
        assert frame.columns == ["id", "topic", "partition", "kafka_offset", "reason", "raw_digest", "received_at"]
    body = (tmp_path / "csv" / "dead_letters.csv").read_text()
    assert not any(factories.dead_letter(i)["raw"].hex() in body for i in range(3))


def test_unknown_table_names_the_valid_ones_and_writes_nothing(servers: ServerSet, analytics: Engine,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(export.UnknownTableError) as caught:
        export.run(servers.settings, fmt="csv", tables=["geography", "patients", "alembic_version"], out_dir=out,
                   console=QUIET)
    assert caught.value.status == 400
    assert "unknown table(s): patients, alembic_version" in caught.value.message
    assert "valid tables: billing_status_counts, daily_registrations, dead_letters, demographics" in \
        caught.value.message
    assert not out.exists()


def test_unknown_format_and_chunk_size_are_refused(servers: ServerSet, tmp_path: Path) -> None:
    with pytest.raises(errors.BadRequest, match="unknown export format 'xlsx'; use one of: parquet, csv"):
        export.run(servers.settings, fmt="xlsx", tables=None, out_dir=tmp_path)
    with pytest.raises(errors.BadRequest, match="chunk_rows"):
        export.run(servers.settings, fmt="csv", tables=None, out_dir=tmp_path, chunk_rows=0)


def test_a_failed_export_leaves_no_file_that_looks_finished(servers: ServerSet, loaded: dict[str, Any],
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_chunks = export._chunks

    def failing(*args: Any, **kwargs: Any) -> Any:
        chunks = real_chunks(*args, **kwargs)
        yield next(chunks)
        raise ConnectionError("database went away")

    monkeypatch.setattr(export, "_chunks", failing)
    with pytest.raises(ConnectionError):
        export.run(servers.settings, fmt="parquet", tables=["patient_facts"], out_dir=tmp_path, chunk_rows=10,
                   console=QUIET)
    assert list(tmp_path.iterdir()) == []


def test_export_reads_as_the_analyst_role_in_one_snapshot(servers: ServerSet, loaded: dict[str, Any],
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         analytics: Engine) -> None:
    """Rows committed by the pipeline while an export runs appear in none of its files."""
    from sqlalchemy import text

    real_export_table = export._export_table
    seen_roles: list[str] = []

    def export_then_write(conn: Any, table: Any, **kwargs: Any) -> Any:
        seen_roles.append(conn.execute(text("SELECT current_user")).scalar_one())
        result = real_export_table(conn, table, **kwargs)
        if table.name == "billing_status_counts":  # first table: the pipeline commits meanwhile
            with analytics.begin() as writer:
                writer.execute(text("UPDATE geography SET patients = patients + 1000"))
        return result

    monkeypatch.setattr(export, "_export_table", export_then_write)
    export.run(servers.settings, fmt="parquet", tables=["billing_status_counts", "geography"], out_dir=tmp_path,
               console=QUIET)
    assert set(seen_roles) == {"pms_analyst"}
    exported = pl.read_parquet(tmp_path / "geography.parquet")
    assert int(exported["patients"].sum()) == 115  # the snapshot, not the later +1000s


def test_cli_export_and_its_error(servers: ServerSet, loaded: dict[str, Any], tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PMS_")},
           **to_env(servers.settings)}
    ok = subprocess.run([sys.executable, "-m", "pms.cli", "export", "--format", "csv", "--table", "geography",
                         "--to", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "geography" in ok.stderr
    assert (tmp_path / "geography.csv").exists()
    bad = subprocess.run([sys.executable, "-m", "pms.cli", "export", "--table", "patients", "--to", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "unknown table(s): patients; valid tables:" in bad.stderr
    assert "Traceback" not in bad.stderr
