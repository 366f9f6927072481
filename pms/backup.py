"""``pms backup`` / ``pms restore``: checksummed dumps of every service database.

One ``pg_dump`` custom-format file per database plus ``manifest.json`` (sizes, SHA-256,
server version). Each dump is a consistent snapshot of its database. Databases are
dumped patients -> billing -> auth -> analytics: billing after patients means every
account a restored patient points at is in the billing dump (billing may hold a few
newer accounts, which the idempotent CreateBillingAccount simply finds again), and
analytics last because it can always be rebuilt from the outbox with ``pms replay``.

Restore refuses a damaged or partial backup before touching anything, and refuses a
running system (a database with open connections) rather than racing live services.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg import sql
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy.engine import URL

from pms import process
from pms.embedded import EmbeddedPostgres, libpq_dsn, pg_bin
from pms.settings import Mode, Settings

#: Dump order (see module docstring for why).
BACKUP_ORDER = ("patients", "billing", "auth", "analytics")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1

console = Console(stderr=True)


class BackupError(RuntimeError):
    """A backup or restore that cannot proceed; the message says why and what to do."""


@dataclass(frozen=True)
class DumpEntry:
    database: str
    file: str
    size: int
    sha256: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _server(settings: Settings) -> Iterator[None]:
    """Make sure the database server answers; start the embedded one for the duration if needed."""
    if settings.mode is Mode.EXTERNAL or process.port_in_use(settings.postgres.host, settings.postgres.port):
        yield
        return
    postgres = EmbeddedPostgres(settings)
    postgres.start()
    try:
        yield
    finally:
        postgres.stop()


def _dsn(url: URL) -> str:
    return libpq_dsn(url)


def backup(settings: Settings, *, to: Path | None = None) -> Path:
    """Dump every service database into ``to`` and write the manifest; return the folder."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = (to or settings.data_dir / "backups" / stamp).resolve()
    if target.exists() and any(target.iterdir()):
        raise BackupError(f"{target} is not empty; choose a new folder with --to")
    target.mkdir(parents=True, exist_ok=True)
    entries: list[DumpEntry] = []
    with _server(settings), _progress() as progress:
        task = progress.add_task("backup", total=len(BACKUP_ORDER))
        server_version = _server_version(settings)
        for database in BACKUP_ORDER:
            progress.update(task, description=f"dumping {database}")
            out = target / f"{database}.dump"
            result = subprocess.run(
                [str(pg_bin("pg_dump")), "--format=custom", "--no-owner", f"--file={out}",
                 f"--dbname={_dsn(settings.database_url_for(database))}"],
                capture_output=True, text=True, check=False,
            )
            if result.returncode != 0:
                raise BackupError(f"pg_dump of {database} failed: {result.stderr.strip()}")
            entries.append(DumpEntry(database, out.name, out.stat().st_size, _sha256(out)))
            progress.advance(task)
    manifest = {
        "format": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(),
        "server_version": server_version,
        "databases": [entry.__dict__ for entry in entries],
    }
    # The manifest is written last: a folder without one is a backup that did not finish.
    tmp = target / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.rename(target / MANIFEST)
    total = sum(entry.size for entry in entries)
    console.print(f"[green]backup written[/] to {target} ({len(entries)} databases, {total / 1e6:.1f} MB)")
    return target


def verify(source: Path) -> list[DumpEntry]:
    """Check a backup folder is complete and undamaged; raise :class:`BackupError` otherwise."""
    manifest_path = source / MANIFEST
    if not manifest_path.is_file():
        raise BackupError(f"{source} has no {MANIFEST}: not a finished pms backup")
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = [DumpEntry(**item) for item in manifest["databases"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"{manifest_path} is damaged: {exc}") from exc
    if manifest.get("format") != FORMAT_VERSION:
        raise BackupError(f"{manifest_path} has format {manifest.get('format')!r}; expected {FORMAT_VERSION}")
    missing = set(BACKUP_ORDER) - {entry.database for entry in entries}
    if missing:
        raise BackupError(f"backup is partial: no dump of {', '.join(sorted(missing))}")
    for entry in entries:
        path = source / entry.file
        if not path.is_file():
            raise BackupError(f"backup is partial: {entry.file} is missing")
        if path.stat().st_size != entry.size:
            raise BackupError(f"{entry.file} is damaged: size {path.stat().st_size}, manifest says {entry.size}")
        if _sha256(path) != entry.sha256:
            raise BackupError(f"{entry.file} is damaged: checksum does not match the manifest")
        listing = subprocess.run([str(pg_bin("pg_restore")), "--list", str(path)],
                                 capture_output=True, text=True, check=False)
        if listing.returncode != 0:
            raise BackupError(f"{entry.file} is not a readable dump: {listing.stderr.strip()}")
    return entries


def restore(settings: Settings, *, source: Path) -> None:
    """Recreate every service database from ``source`` (verified first, all or nothing per database)."""
    source = source.resolve()
    entries = verify(source)
    with _server(settings), _progress() as progress:
        _refuse_running_system(settings)
        task = progress.add_task("restore", total=len(entries))
        for entry in sorted(entries, key=lambda e: BACKUP_ORDER.index(e.database)):
            progress.update(task, description=f"restoring {entry.database}")
            _recreate_database(settings, entry.database)
            use_list = _restorable_toc(source / entry.file)
            result = subprocess.run(
                [str(pg_bin("pg_restore")), "--no-owner", "--exit-on-error", "--single-transaction",
                 f"--use-list={use_list}", f"--dbname={_dsn(settings.database_url_for(entry.database))}",
                 str(source / entry.file)],
                capture_output=True, text=True, check=False,
            )
            use_list.unlink(missing_ok=True)
            if result.returncode != 0:
                raise BackupError(f"pg_restore of {entry.database} failed: {result.stderr.strip()}")
            progress.advance(task)
        if settings.mode is Mode.EMBEDDED:
            EmbeddedPostgres(settings).bootstrap()  # grants for the analyst role on the new tables
    console.print(f"[green]restored[/] {len(entries)} databases from {source}")


def _restorable_toc(dump: Path) -> Path:
    """The dump's table of contents without ``COMMENT ON EXTENSION`` entries.

    Only an extension's owner (a superuser) may comment on it, and the application role
    restores as itself; the extensions themselves are trusted and restore fine.
    """
    listing = subprocess.run([str(pg_bin("pg_restore")), "--list", str(dump)],
                             capture_output=True, text=True, check=True).stdout
    kept = [line for line in listing.splitlines() if " COMMENT - EXTENSION " not in line]
    with tempfile.NamedTemporaryFile("w", suffix=".toc", prefix=f"pms-{dump.stem}-", delete=False) as handle:
        handle.write("\n".join(kept) + "\n")
    return Path(handle.name)


def _server_version(settings: Settings) -> str:
    with psycopg.connect(_dsn(settings.database_url_for("patients"))) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"


def _maintenance_dsn(settings: Settings) -> str:
    return _dsn(settings.server_url().set(database="postgres", drivername="postgresql+psycopg"))


def _refuse_running_system(settings: Settings) -> None:
    with psycopg.connect(_maintenance_dsn(settings), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname, count(*) FROM pg_stat_activity WHERE datname = ANY(%s) AND pid <> pg_backend_pid() "
            "GROUP BY datname",
            (list(BACKUP_ORDER),),
        ).fetchall()
    busy = [f"{name} ({count})" for name, count in rows if count]
    if busy:
        raise BackupError(
            "the system is running (open connections to " + ", ".join(busy) + "); stop `pms up` and retry"
        )


def _recreate_database(settings: Settings, database: str) -> None:
    with psycopg.connect(_maintenance_dsn(settings), autocommit=True) as conn:
        owner = settings.server_url().username
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(database)))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), sql.Identifier(owner)))
    if settings.mode is Mode.EMBEDDED:
        EmbeddedPostgres(settings).bootstrap()


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console)
