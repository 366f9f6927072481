"""The analysts' one door into the data: read-only analytics queries as Polars, and ``pms notebooks``.

Notebooks never build connection strings or read another service's database. They call
:func:`connect`, which logs in as the read-only role ``pms_analyst`` (``settings.analyst_url()``)
on the ``analytics`` database only. The role holds nothing but ``SELECT`` there and cannot
connect to ``patients``/``auth``/``billing``; the helper also asks every transaction to be
read-only, so a notebook cannot change data even if the role were misconfigured.

``pms notebooks`` (:func:`launch`) opens JupyterLab on ``notebooks/`` with a kernel that
runs in this environment (so ``import pms`` works) and gets only what it needs to reach the
analytics tables: no application database password, no JWT signing key.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import polars as pl
from sqlalchemy import Engine, text

from pms.db import make_engine
from pms.settings import SECRET_VARIABLES, Settings, get_settings, to_env

#: Where the analyst notebooks live (the repository's ``notebooks/`` folder).
NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
#: Session options of every analyst connection: read-only transactions, and a bound on
#: runaway queries so one notebook cannot hold the analytics database for long.
SESSION_OPTIONS = "-c default_transaction_read_only=on -c statement_timeout=120000"
#: Prefix of the machine-readable result line each notebook prints last.
RESULT_MARKER = "PMS_RESULT "


def analyst_engine(settings: Settings) -> Engine:
    """An engine on the analytics database as the read-only analyst role (small pool)."""
    return make_engine(
        settings.analyst_url(),
        pool_size=1,
        max_overflow=2,
        connect_args={"options": SESSION_OPTIONS, "application_name": "pms-notebook"},
    )


class Analytics:
    """Read-only access to the analytics tables, answering with Polars DataFrames."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def query(self, sql: str, /, **params: Any) -> pl.DataFrame:
        """Run one SELECT with bound ``:name`` parameters and return its rows.

        Parameters are always bound, never formatted into the SQL, so a parameter cell
        cannot inject SQL. UUIDs come back as strings (Polars has no UUID type).
        """
        with self.engine.connect() as conn:
            result = conn.execute(text(sql), params)
            columns = list(result.keys())
            types = [_POLARS_TYPES.get(column.type_code) for column in result.cursor.description or ()]
            rows = [tuple(_plain(value) for value in row) for row in result]
        frame = (pl.DataFrame(rows, schema=columns, orient="row", infer_schema_length=None) if rows
                 else pl.DataFrame({name: [] for name in columns}))
        # A column with no value to infer from (no rows, or all NULL) would be Polars' Null type, which
        # date, string and chart operations refuse: type it from what PostgreSQL says the column is.
        return frame.with_columns(pl.col(name).cast(dtype) for name, dtype in zip(columns, types, strict=False)
                                  if dtype is not None and frame.schema[name] == pl.Null)

    def scalar(self, sql: str, /, **params: Any) -> Any:
        """The single value of a one-row, one-column query."""
        with self.engine.connect() as conn:
            return _plain(conn.execute(text(sql), params).scalar_one())

    def tables(self) -> list[str]:
        """Names of the analytics tables this role may read (Alembic's bookkeeping excluded)."""
        frame = self.query(
            "SELECT tablename AS table_name FROM pg_catalog.pg_tables "
            "WHERE schemaname = 'public' AND tablename <> 'alembic_version' "
            "AND has_any_column_privilege(format('%I.%I', schemaname, tablename), 'SELECT') "
            "ORDER BY tablename"
        )
        return frame.get_column("table_name").to_list() if frame.height else []

    def table(self, name: str, *, limit: int | None = None) -> pl.DataFrame:
        """A whole analytics table (or its first ``limit`` rows), the columns this role may read.

        ``dead_letters.raw`` (bytes that may hold a name or an email) is not granted to the analyst.

        Raises:
            KeyError: ``name`` is not an analytics table; the message lists the valid ones.
        """
        known = self.tables()
        if name not in known:
            raise KeyError(f"unknown analytics table {name!r}; valid tables: {', '.join(known)}")
        readable = self.query(
            "SELECT attname FROM pg_catalog.pg_attribute "
            "WHERE attrelid = format('public.%I', CAST(:name AS text))::regclass "
            "AND attnum > 0 AND NOT attisdropped AND has_column_privilege(attrelid, attnum, 'SELECT') "
            "ORDER BY attnum", name=name,
        ).get_column("attname").to_list()
        columns = ", ".join('"' + column.replace('"', '""') + '"' for column in readable)
        sql = f'SELECT {columns} FROM "{name}"'  # noqa: S608 -- names checked against the catalogue above
        if limit is not None:
            return self.query(sql + " LIMIT :limit", limit=int(limit))
        return self.query(sql)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Analytics:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


#: Polars type of a PostgreSQL column type (by OID), for columns whose values say nothing (see ``query``).
_POLARS_TYPES: dict[int, pl.DataType] = {
    16: pl.Boolean(), 20: pl.Int64(), 21: pl.Int64(), 23: pl.Int64(), 26: pl.Int64(),
    700: pl.Float64(), 701: pl.Float64(), 1700: pl.Float64(),
    18: pl.String(), 19: pl.String(), 25: pl.String(), 1042: pl.String(), 1043: pl.String(), 2950: pl.String(),
    1082: pl.Date(), 1114: pl.Datetime("us"), 1184: pl.Datetime("us", "UTC"), 1186: pl.Duration("us"),
    17: pl.Binary(),
}


def _plain(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def connect(settings: Settings | None = None) -> Analytics:
    """Open read-only access to the analytics tables (settings from ``PMS_*`` when omitted)."""
    return Analytics(analyst_engine(settings or get_settings()))


def report(notebook: str, **numbers: Any) -> dict[str, Any]:
    """Print a notebook's key numbers as one JSON line, so tests and scripts can check them.

    The line starts with :data:`RESULT_MARKER`; values must be JSON-serialisable (dates
    become ISO strings). Only aggregate numbers belong here, never anything about a person.
    """
    payload = {"notebook": notebook, **numbers}
    print(RESULT_MARKER + json.dumps(payload, sort_keys=True, default=str))
    return payload


def parse_report(lines: Sequence[str] | str) -> dict[str, Any] | None:
    """The last result line printed by :func:`report` in ``lines`` (None when there is none)."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    for line in reversed(list(lines)):
        if line.startswith(RESULT_MARKER):
            return dict(json.loads(line.removeprefix(RESULT_MARKER)))
    return None


def kernel_env(settings: Settings) -> dict[str, str]:
    """``PMS_*`` variables for a notebook kernel: the analyst login and nothing that can write.

    Built from :func:`pms.settings.to_env` with the application database URL, the admin
    password and the JWT signing key removed; the analyst URL is resolved here (in embedded
    mode it comes from a generated secret) so the kernel needs no other secret. The kernel
    gets a throwaway JWT key because ``Settings`` insists on one; it never signs anything.
    """
    env = {key: value for key, value in to_env(settings).items() if key not in SECRET_VARIABLES}
    env["PMS_ANALYST_DATABASE_URL"] = settings.analyst_url().render_as_string(hide_password=False)
    env["PMS_JWT__SECRET"] = secrets.token_urlsafe(48)
    return env


def process_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The full environment of a Jupyter process: ``base`` minus any ``PMS_*``, plus :func:`kernel_env`."""
    source = os.environ if base is None else base
    return {**{k: v for k, v in source.items() if not k.startswith("PMS_")}, **kernel_env(settings)}


def lab_command(*, port: int | None = None, open_browser: bool = True, token: str | None = None) -> list[str]:
    """The JupyterLab command line ``pms notebooks`` runs (from this environment's Python)."""
    argv = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={NOTEBOOK_DIR}",
            # No calls home: the machine may be offline, and it is a clinic's analysis box.
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:  # containers often run as root; Jupyter refuses that unless told
        argv.append("--allow-root")
    if port is not None:
        argv.append(f"--ServerApp.port={port}")
    if not open_browser:
        argv.append("--no-browser")
    if token is not None:
        argv.append(f"--IdentityProvider.token={token}")
    return argv


def launch(settings: Settings, *, port: int | None = None, open_browser: bool = True) -> int:
    """Open JupyterLab on the analyst notebooks and block until it exits; return its exit code.

    Raises:
        RuntimeError: JupyterLab is not installed (it is the optional ``notebooks`` extra), or
            there is no ``notebooks/`` folder (a non-editable install carries none).
    """
    try:
        import jupyterlab  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "JupyterLab is not installed; it is an optional extra: pip install -e '.[notebooks]'"
        ) from exc
    if not NOTEBOOK_DIR.is_dir():
        raise RuntimeError(f"no notebooks folder at {NOTEBOOK_DIR}; run `pms notebooks` from a checkout "
                           "installed with `pip install -e '.[notebooks]'`")
    analytics = connect(settings)
    try:
        analytics.scalar("SELECT 1")
    except Exception as exc:  # the lab is still useful for reading; say why queries will fail
        print(f"warning: the analytics database does not answer yet ({type(exc).__name__}); "
              "start the system with `pms up` first", file=sys.stderr)
    finally:
        analytics.close()
    command = lab_command(port=port, open_browser=open_browser)
    return subprocess.call(command, env=process_env(settings), cwd=NOTEBOOK_DIR)


def inject_parameters(notebook: Any, parameters: Mapping[str, Any]) -> None:
    """Put ``parameters`` in a cell right after the one tagged ``parameters`` (papermill's convention).

    Raises:
        ValueError: the notebook has no cell tagged ``parameters``.
    """
    import nbformat

    for index, cell in enumerate(notebook.cells):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
            injected = nbformat.v4.new_code_cell(source)
            injected.metadata["tags"] = ["injected-parameters"]
            notebook.cells.insert(index + 1, injected)
            return
    raise ValueError("the notebook has no cell tagged 'parameters'")


def execute(path: Path, settings: Settings, *, parameters: Mapping[str, Any] | None = None,
            timeout: float = 120.0) -> tuple[Any, dict[str, Any] | None]:
    """Run a notebook headless in a fresh kernel of this environment; return it and its report.

    The kernel gets :func:`process_env` (the analyst login only). Any cell error raises
    ``nbclient.exceptions.CellExecutionError`` naming the cell.
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    if parameters:
        inject_parameters(notebook, parameters)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=process_env(settings))
    lines: list[str] = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stdout":
                lines.extend(str(output.get("text", "")).splitlines())
    return notebook, parse_report(lines)
