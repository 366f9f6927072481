"""``pms export``: write the analytics tables to Parquet or CSV files for use elsewhere.

It reads as the read-only analyst role (the same door the notebooks use), in one
``REPEATABLE READ`` read-only transaction, so all files of one export describe the same
moment (``sum(demographics.patients)`` in the files equals the active facts in the files,
even while the pipeline keeps writing). Each table is read through a server-side cursor in
chunks of ``chunk_rows`` and appended to its file chunk by chunk, so memory stays flat
however big ``patient_facts`` grows. A file is written under a temporary name and renamed
when complete: a crashed export never leaves a truncated file that looks finished.

``dead_letters.raw`` (the bytes of a message the pipeline could not read, which may hold a
patient's name and email) is never exported: the analyst role cannot read it (migration
``0002_dead_letter_privacy``), and :data:`WITHHELD_COLUMNS` keeps it out of the files even when
the configured analyst login could.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import Column, Connection, Table, Text, cast, func, select, types

from pms import errors
from pms.notebook import analyst_engine
from pms.settings import Settings
from stream_processing import models as analytics_models

Format = Literal["parquet", "csv"]
FORMATS: tuple[str, ...] = ("parquet", "csv")
#: Rows fetched from the server and written per step.
DEFAULT_CHUNK_ROWS = 50_000
#: Columns never written to an export file, per table (they may hold health data).
WITHHELD_COLUMNS: dict[str, frozenset[str]] = {"dead_letters": frozenset({"raw"})}


class UnknownTableError(errors.BadRequest):
    """A requested table is not an analytics table."""


@dataclass(frozen=True, slots=True)
class ExportedTable:
    table: str
    path: Path
    rows: int


def exportable_tables() -> list[str]:
    """The analytics tables ``pms export`` knows, in a stable order (the published contract)."""
    return sorted(analytics_models.metadata.tables)


def _polars_type(column: Column[object]) -> pl.DataType:
    kind = column.type
    # Order matters: BigInteger and SmallInteger are Integer subclasses.
    mapping: list[tuple[type[types.TypeEngine[object]], pl.DataType]] = [
        (types.BigInteger, pl.Int64()),
        (types.SmallInteger, pl.Int16()),
        (types.Integer, pl.Int32()),
        (types.Boolean, pl.Boolean()),
        (types.Double, pl.Float64()),
        (types.Float, pl.Float64()),
        (types.Numeric, pl.Float64()),
        (types.DateTime, pl.Datetime("us", "UTC")),
        (types.Date, pl.Date()),
        (types.LargeBinary, pl.Binary()),
        (types.Uuid, pl.String()),
    ]
    for sa_type, pl_type in mapping:
        if isinstance(kind, sa_type):
            if isinstance(kind, types.DateTime) and not kind.timezone:
                return pl.Datetime("us")
            return pl_type
    return pl.String()


def exported_columns(table: Table) -> list[Column[object]]:
    """The columns of ``table`` an export writes: all but :data:`WITHHELD_COLUMNS`."""
    withheld = WITHHELD_COLUMNS.get(table.name, frozenset())
    return [column for column in table.columns if column.name not in withheld]


def table_schema(table: Table) -> dict[str, pl.DataType]:
    """The Polars schema of one exported table (fixed, so every chunk and file agrees)."""
    return {column.name: _polars_type(column) for column in exported_columns(table)}


def _order_by(table: Table) -> list[Column[object]]:
    # A stable order makes two exports of the same data byte-comparable.
    key = list(table.primary_key.columns) or exported_columns(table)
    return key  # type: ignore[return-value]


def _chunks(conn: Connection, table: Table, chunk_rows: int) -> Iterator[pl.DataFrame]:
    schema = table_schema(table)
    # UUIDs are cast to text by the server, so every value arrives as a type Polars takes as is.
    columns = [cast(c, Text).label(c.name) if isinstance(c.type, types.Uuid) else c for c in exported_columns(table)]
    result = conn.execution_options(stream_results=True, yield_per=chunk_rows).execute(
        select(*columns).order_by(*_order_by(table))
    )
    for rows in result.partitions():
        values = list(zip(*rows, strict=True)) if rows else [() for _ in schema]
        yield pl.DataFrame([pl.Series(name, list(column), dtype=dtype)
                            for (name, dtype), column in zip(schema.items(), values, strict=True)])


def _for_csv(frame: pl.DataFrame) -> pl.DataFrame:
    """CSV has no bytes: binary columns are written as lowercase hex."""
    binary = [name for name, dtype in frame.schema.items() if dtype == pl.Binary]
    if not binary:
        return frame
    return frame.with_columns(pl.col(name).bin.encode("hex") for name in binary)


def _export_table(conn: Connection, table: Table, *, fmt: str, out_dir: Path, chunk_rows: int,
                  progress: Progress) -> ExportedTable:
    total = conn.execute(select(func.count()).select_from(table)).scalar_one()
    task = progress.add_task(table.name, total=total)
    final = out_dir / f"{table.name}.{fmt}"
    partial = out_dir / f".{table.name}.{fmt}.partial"
    rows = 0
    try:
        if fmt == "parquet":
            schema = pl.DataFrame(schema=table_schema(table)).to_arrow().schema
            with pq.ParquetWriter(partial, schema, compression="zstd") as writer:
                for chunk in _chunks(conn, table, chunk_rows):
                    writer.write_table(chunk.to_arrow())
                    rows += chunk.height
                    progress.update(task, advance=chunk.height)
        else:
            with open(partial, "wb") as handle:
                header = pl.DataFrame(schema=table_schema(table))
                _for_csv(header).write_csv(handle, include_header=True)
                for chunk in _chunks(conn, table, chunk_rows):
                    _for_csv(chunk).write_csv(handle, include_header=False)
                    rows += chunk.height
                    progress.update(task, advance=chunk.height)
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    progress.update(task, completed=rows, total=rows)
    return ExportedTable(table=table.name, path=final, rows=rows)


def run(
    settings: Settings,
    *,
    fmt: Format | str,
    tables: Sequence[str] | None,
    out_dir: Path,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    console: Console | None = None,
) -> list[ExportedTable]:
    """Write the analytics tables (all, or ``tables``) to ``out_dir`` as ``<table>.<fmt>``.

    Returns:
        One entry per written file, in the order written, with its row count.

    Raises:
        BadRequest: ``fmt`` is not ``parquet`` or ``csv``.
        UnknownTableError: a requested table is not an analytics table; the message names the valid ones.
    """
    if fmt not in FORMATS:
        raise errors.BadRequest(f"unknown export format {fmt!r}; use one of: {', '.join(FORMATS)}",
                                errors={"format": "must be parquet or csv"})
    if chunk_rows < 1:
        raise errors.BadRequest("chunk_rows must be at least 1", errors={"chunk_rows": "must be >= 1"})
    valid = exportable_tables()
    wanted = list(dict.fromkeys(tables)) if tables else valid
    unknown = [name for name in wanted if name not in valid]
    if unknown:
        raise UnknownTableError(
            f"unknown table(s): {', '.join(unknown)}; valid tables: {', '.join(valid)}",
            errors={"table": f"must be one of: {', '.join(valid)}"},
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    console = console or Console(stderr=True)
    engine = analyst_engine(settings)
    written: list[ExportedTable] = []
    try:
        with engine.connect() as conn, Progress(
            TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=False,
        ) as progress:
            conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            with conn.begin():
                for name in wanted:
                    table = analytics_models.metadata.tables[name]
                    written.append(_export_table(conn, table, fmt=fmt, out_dir=out_dir, chunk_rows=chunk_rows,
                                                 progress=progress))
    finally:
        engine.dispose()
    for item in written:
        console.print(f"[green]exported[/] {item.table}: {item.rows} rows -> {item.path}", soft_wrap=True)
    return written
