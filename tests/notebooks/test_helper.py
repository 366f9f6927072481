"""pms.notebook: read-only analyst access, the kernel's environment, `pms notebooks`."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nbformat
import polars as pl
import psycopg
import pytest
from pydantic import SecretStr
from sqlalchemy.exc import DBAPIError

from pms import notebook as pms_notebook
from pms import process
from pms.embedded import libpq_dsn
from pms.settings import Settings
from tests.fixtures.servers import ServerSet
from tests.tools.check_notebooks_clean import dirty_notebooks

pytestmark = pytest.mark.integration
NOTEBOOKS = sorted(pms_notebook.NOTEBOOK_DIR.glob("*.ipynb"))


@pytest.fixture(scope="module")
def analytics(servers: ServerSet, synthetic: dict[str, Any]) -> Iterator[pms_notebook.Analytics]:
    with pms_notebook.connect(servers.settings) as reader:
        yield reader


def test_query_returns_polars_with_bound_parameters(analytics: pms_notebook.Analytics,
                                                    synthetic: dict[str, Any]) -> None:
    active = [f for f in synthetic["patient_facts"] if f["active"]]
    london = sum(1 for f in active if f["city"] == "London")
    frame = analytics.query("SELECT city, patients FROM geography WHERE city = :city", city="London")
    assert isinstance(frame, pl.DataFrame)
    assert frame.to_dicts() == [{"city": "London", "patients": london}]
    # A parameter is data, never SQL: an injection attempt just matches nothing.
    assert analytics.query("SELECT city FROM geography WHERE city = :city", city="x' OR '1'='1").height == 0


def test_uuid_columns_come_back_as_strings(analytics: pms_notebook.Analytics, synthetic: dict[str, Any]) -> None:
    facts = analytics.query("SELECT patient_id FROM patient_facts ORDER BY patient_id")
    assert facts.schema["patient_id"] == pl.String
    assert sorted(facts["patient_id"].to_list()) == sorted(str(f["patient_id"]) for f in synthetic["patient_facts"])


def test_empty_result_keeps_its_columns(analytics: pms_notebook.Analytics) -> None:
    frame = analytics.query("SELECT city, patients FROM geography WHERE patients < 0")
    assert frame.height == 0
    assert frame.columns == ["city", "patients"]


def test_columns_with_nothing_to_infer_from_get_their_database_types(analytics: pms_notebook.Analytics) -> None:
    empty = analytics.query("SELECT day, registrations FROM daily_registrations WHERE registrations < 0")
    assert empty.schema == {"day": pl.Date, "registrations": pl.Int64}
    nulls = analytics.query("SELECT CAST(NULL AS timestamptz) AS at, CAST(NULL AS text) AS city,"
                            " CAST(NULL AS double precision) AS p99, CAST(NULL AS boolean) AS active")
    assert nulls.schema == {"at": pl.Datetime("us", "UTC"), "city": pl.String, "p99": pl.Float64,
                            "active": pl.Boolean}
    assert nulls.height == 1 and nulls.row(0) == (None, None, None, None)


def test_tables_lists_the_analytics_contract_and_table_rejects_others(analytics: pms_notebook.Analytics) -> None:
    from stream_processing import models

    assert analytics.tables() == sorted(models.metadata.tables)
    assert analytics.table("pipeline_status").height == 1
    assert analytics.table("patient_facts", limit=5).height == 5
    with pytest.raises(KeyError, match=r"unknown analytics table 'patients'; valid tables: .*patient_facts"):
        analytics.table("patients")
    with pytest.raises(KeyError, match="valid tables"):
        analytics.table('geography"; DROP TABLE geography; --')


def test_dead_letters_are_listed_and_read_without_their_raw_bytes(analytics: pms_notebook.Analytics) -> None:
    """The analyst may not read ``dead_letters.raw``: ``table`` returns every other column."""
    dead = analytics.table("dead_letters")
    assert dead.columns == ["id", "topic", "partition", "kafka_offset", "reason", "raw_digest", "received_at"]
    assert dead.height == 2
    with pytest.raises(DBAPIError) as caught:
        analytics.query("SELECT raw FROM dead_letters")
    assert isinstance(caught.value.orig, psycopg.errors.InsufficientPrivilege)


def test_transactions_are_read_only(analytics: pms_notebook.Analytics) -> None:
    for statement in (
        "INSERT INTO geography (city, patients) VALUES ('Nowhere', 1)",
        "UPDATE geography SET patients = patients + 1",
        "DELETE FROM patient_facts",
        "CREATE TABLE scratch (x int)",
    ):
        with pytest.raises(DBAPIError) as caught:
            analytics.query(statement)
        assert isinstance(caught.value.orig, psycopg.errors.ReadOnlySqlTransaction), statement


def test_the_role_itself_cannot_write_even_in_a_read_write_transaction(servers: ServerSet,
                                                                      synthetic: dict[str, Any]) -> None:
    """Defence in depth: with read-only switched off, the role's privileges still refuse writes."""
    before = sum(1 for f in synthetic["patient_facts"] if f["active"])
    with psycopg.connect(libpq_dsn(servers.settings.analyst_url()), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("pms_analyst",)
        conn.execute("SET default_transaction_read_only = off")
        for statement in (
            "INSERT INTO geography (city, patients) VALUES ('Nowhere', 1)",
            "UPDATE demographics SET patients = 0",
            "TRUNCATE dead_letters",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE public.scratch (x int)")
        assert conn.execute("SELECT sum(patients) FROM geography").fetchone() == (before,)


@pytest.mark.parametrize("database", ["patients", "auth", "billing"])
def test_the_role_cannot_connect_to_other_databases(servers: ServerSet, database: str) -> None:
    url = servers.settings.analyst_url().set(database=database)
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(libpq_dsn(url), connect_timeout=5).close()


def test_helper_refuses_patients_database_even_if_pointed_at_it(servers: ServerSet) -> None:
    url = servers.settings.analyst_url().set(database="patients")
    settings = servers.make_settings(analyst_database_url=SecretStr(url.render_as_string(hide_password=False)))
    reader = pms_notebook.connect(settings)
    try:
        with pytest.raises(DBAPIError, match="permission denied for database"):
            reader.query("SELECT count(*) FROM patients")
    finally:
        reader.close()


def test_kernel_env_carries_the_analyst_login_and_nothing_that_can_write(servers: ServerSet,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    external = servers.make_settings(
        database_url=SecretStr("postgresql://pms:app-secret@db.example:5432/postgres"),
        analyst_database_url=SecretStr("postgresql://pms_analyst:ro-secret@db.example:5432/analytics"),
        admin_password=SecretStr("admin-secret-123"),
    )
    env = pms_notebook.kernel_env(external)
    assert "PMS_DATABASE_URL" not in env
    assert "PMS_ADMIN_PASSWORD" not in env
    assert env["PMS_JWT__SECRET"] != external.jwt.secret.get_secret_value()  # type: ignore[union-attr]
    assert "app-secret" not in json.dumps(env)
    # A kernel rebuilding its settings from this environment reaches exactly the analyst login.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rebuilt = Settings(_env_file=None)  # type: ignore[call-arg]
    assert rebuilt.analyst_url().username == "pms_analyst"
    assert rebuilt.analyst_url().password == "ro-secret"
    assert rebuilt.database_url is None


def test_kernel_env_resolves_the_embedded_analyst_password(servers: ServerSet) -> None:
    env = pms_notebook.kernel_env(servers.settings)
    assert env["PMS_ANALYST_DATABASE_URL"] == servers.settings.analyst_url().render_as_string(hide_password=False)
    full = pms_notebook.process_env(servers.settings, base={"PATH": "/bin", "PMS_DATABASE_URL": "leak"})
    assert full["PATH"] == "/bin"
    assert "PMS_DATABASE_URL" not in full


def test_report_roundtrip() -> None:
    lines = ["noise", pms_notebook.RESULT_MARKER + '{"notebook": "old"}', "more noise"]
    assert pms_notebook.parse_report(lines) == {"notebook": "old"}
    assert pms_notebook.parse_report("nothing here") is None


def test_notebooks_exist_are_clean_and_start_with_a_parameters_cell() -> None:
    names = {path.stem for path in NOTEBOOKS}
    assert {"registrations", "demographics", "data_quality"} <= names
    assert dirty_notebooks(pms_notebook.NOTEBOOK_DIR) == []
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert "parameters" in code_cells[0].metadata.get("tags", []), path.name
        source = "\n".join(cell.source for cell in code_cells)
        # Reads only through the helper: no connection strings, no other database, no writes.
        assert "pms_nb.connect()" in source
        for forbidden in ("create_engine", "psycopg", "database_url_for", "analyst_url", "INSERT ", "UPDATE ",
                          "DELETE "):
            assert forbidden not in source, f"{path.name} uses {forbidden!r}"
        assert "import altair" in source
        # Every code cell after the parameters is followed somewhere by a plain-words explanation.
        assert sum(cell.cell_type == "markdown" for cell in notebook.cells) >= len(code_cells) // 2


def test_inject_parameters_needs_a_parameters_cell() -> None:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    with pytest.raises(ValueError, match="no cell tagged 'parameters'"):
        pms_notebook.inject_parameters(notebook, {"x": 2})
    notebook.cells[0].metadata["tags"] = ["parameters"]
    pms_notebook.inject_parameters(notebook, {"x": 2, "name": "it's"})
    assert notebook.cells[1].source == "x = 2\nname = \"it's\""
    assert notebook.cells[1].metadata["tags"] == ["injected-parameters"]


def test_launch_explains_the_missing_extra(servers: ServerSet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jupyterlab", None)
    with pytest.raises(RuntimeError, match=r"optional extra: pip install -e '\.\[notebooks\]'"):
        pms_notebook.launch(servers.settings)


def test_launch_explains_a_missing_notebooks_folder(servers: ServerSet, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pms_notebook, "NOTEBOOK_DIR", tmp_path / "nowhere")
    with pytest.raises(RuntimeError, match=r"no notebooks folder at .*nowhere"):
        pms_notebook.launch(servers.settings)


@pytest.mark.slow
def test_lab_serves_the_notebooks_with_the_project_kernel(servers: ServerSet, tmp_path: Path) -> None:
    """What `pms notebooks` runs: JupyterLab on notebooks/ with the python3 kernel of this venv."""
    port = process.free_port()
    token = "test-token-0123456789"
    proc = process.spawn(
        pms_notebook.lab_command(port=port, open_browser=False, token=token),
        log_path=tmp_path / "lab.log",
        env={**pms_notebook.process_env(servers.settings), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")},
        cwd=pms_notebook.NOTEBOOK_DIR,
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"token {token}"}

    def answers() -> bool:
        try:
            return httpx.get(f"{base}/api/status", headers=headers, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        try:
            process.wait_until(answers, timeout=60, interval=0.2, message="JupyterLab",
                               alive=lambda: proc.poll() is None)
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError((tmp_path / "lab.log").read_text(errors="replace")[-3000:]) from exc
        contents = httpx.get(f"{base}/api/contents", headers=headers, timeout=5).json()
        assert {item["name"] for item in contents["content"]} >= {p.name for p in NOTEBOOKS}
        specs = httpx.get(f"{base}/api/kernelspecs", headers=headers, timeout=5).json()
        assert "python3" in specs["kernelspecs"]
        assert httpx.get(f"{base}/api/contents", timeout=5).status_code == 403  # no token, no access
    finally:
        process.stop(proc)
