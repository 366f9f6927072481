"""``pms backup`` / ``pms restore``: checksummed dumps of every service database.

One ``pg_dump`` custom-format file per database plus ``manifest.json`` (sizes, SHA-256,
server version), in a folder only its owner can read. Each dump is a consistent snapshot of
its database; they are taken analytics -> patients -> billing -> auth:

- analytics first, so it is never ahead of patients. A restored analytics that held a newer
  version of a patient than the restored patients database would ignore that version when the
  patient service hands it out again, for good; one that is behind catches up, because a
  restore clears the relay's state and the relay then republishes the whole outbox.
- billing after patients: every account a restored patient points at is in the billing dump
  (billing may hold a few newer accounts, which the idempotent CreateBillingAccount finds again).

Restore refuses a damaged or partial backup before touching anything, and refuses a running
system (a database with open connections) rather than racing live services. It restores every
dump into a staging database and swaps them all in with one transaction of renames, so a
restore that fails (or is interrupted) leaves the system exactly as it was. Database passwords
go to ``pg_dump``/``pg_restore`` through their environment, never their command line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
from pms.embedded import EmbeddedPostgres, analyst_role, libpq_dsn, pg_bin
from pms.settings import Mode, Settings, install_secret
from pms.supervisor import ADMIN_PASSWORD_FILE, ADMIN_SHOWN_MARKER, read_state

#: Dump order (see module docstring for why).
BACKUP_ORDER = ("analytics", "patients", "billing", "auth")
#: Restore order: the order of the services' dependencies (the swap itself is one transaction).
RESTORE_ORDER = ("patients", "billing", "auth", "analytics")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
#: Suffix of the databases a restore fills before swapping them in.
STAGING_SUFFIX = "__pms_restore"
#: Suffix the replaced databases carry between the swap and their drop.
REPLACED_SUFFIX = "__pms_replaced"

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
    """Make sure the database server answers; start the embedded one for the duration if needed.

    Any failure to reach or log in to it is a :class:`BackupError` naming the server, not a traceback.
    """
    try:
        if settings.mode is Mode.EXTERNAL or process.port_in_use(settings.postgres.host, settings.postgres.port):
            yield
            return
        postgres = EmbeddedPostgres(settings)
        postgres.start()
        try:
            yield
        finally:
            postgres.stop()
    except psycopg.OperationalError as exc:
        where = settings.server_url()
        hint = ("check PMS_DATABASE_URL" if settings.mode is Mode.EXTERNAL else
                "another server may hold PMS_POSTGRES__PORT, or this is not the data dir of that server")
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackupError(f"cannot use PostgreSQL at {where.host}:{where.port} ({first_line}); {hint}") from exc


def _client(url: URL) -> tuple[str, dict[str, str]]:
    """A libpq connection string for ``url`` without its password, and the environment that carries it.

    A password on the command line of pg_dump/pg_restore is readable by every local user (``ps``).
    """
    env = {**os.environ}
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    return libpq_dsn(url._replace(password=None)), env  # URL.set(password=None) keeps the password


def backup(settings: Settings, *, to: Path | None = None) -> Path:
    """Dump every service database into ``to`` and write the manifest; return the folder.

    The folder is made readable by its owner only (the dumps hold patient data and password
    hashes). A backup that fails removes what it wrote.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = (to or settings.data_dir / "backups" / stamp).resolve()
    if target.exists() and any(target.iterdir()):
        raise BackupError(f"{target} is not empty; choose a new folder with --to")
    try:
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        target.chmod(0o700)
    except OSError as exc:
        raise BackupError(f"cannot create {target}: {exc.strerror or exc}") from None
    try:
        manifest = _write_dumps(settings, target)
    except BaseException:
        for item in target.iterdir():
            item.unlink()
        raise
    total = sum(entry["size"] for entry in manifest["databases"])
    console.print(f"[green]backup written[/] to {target} ({len(manifest['databases'])} databases, "
                  f"{total / 1e6:.1f} MB)")
    return target


def _write_dumps(settings: Settings, target: Path) -> dict[str, object]:
    entries: list[DumpEntry] = []
    with _server(settings), _progress() as progress:
        task = progress.add_task("backup", total=len(BACKUP_ORDER))
        server_version = _server_version(settings)
        for database in BACKUP_ORDER:
            progress.update(task, description=f"dumping {database}")
            out = target / f"{database}.dump"
            dsn, env = _client(settings.database_url_for(database))
            result = subprocess.run(
                [str(pg_bin("pg_dump")), "--format=custom", "--no-owner", f"--file={out}", f"--dbname={dsn}"],
                capture_output=True, text=True, check=False, env=env,
            )
            if result.returncode != 0:
                raise BackupError(f"pg_dump of {database} failed: {result.stderr.strip()}")
            out.chmod(0o600)
            _fsync(out)
            entries.append(DumpEntry(database, out.name, out.stat().st_size, _sha256(out)))
            progress.advance(task)
    secrets: list[dict[str, object]] = []
    admin_password = settings.secrets_dir / ADMIN_PASSWORD_FILE
    if settings.mode is Mode.EMBEDDED and admin_password.is_file():
        copy = target / ADMIN_PASSWORD_FILE
        shutil.copyfile(admin_password, copy)
        copy.chmod(0o600)
        _fsync(copy)
        secrets.append({"file": copy.name, "size": copy.stat().st_size, "sha256": _sha256(copy)})
    manifest: dict[str, object] = {
        "format": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(),
        "server_version": server_version,
        "databases": [entry.__dict__ for entry in entries],
        "secrets": secrets,
    }
    # The manifest is written last: a folder without one is a backup that did not finish.
    tmp = target / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))  # inside the 0700 folder
    tmp.chmod(0o600)
    _fsync(tmp)
    tmp.rename(target / MANIFEST)
    _fsync(target)  # the rename itself: "backup written" means on disk, also after a power cut
    return manifest


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(source: Path) -> list[DumpEntry]:
    """Check a backup folder is complete and undamaged; raise :class:`BackupError` otherwise."""
    if not source.is_dir():
        raise BackupError(f"{source} does not exist or is not a folder")
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
        if entry.file != f"{entry.database}.dump":  # never a path out of the folder, nor another database's file
            raise BackupError(f"{manifest_path} is damaged: {entry.database} is stored as {entry.file!r}")
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
    if sorted(entry.database for entry in entries) != sorted(BACKUP_ORDER):
        listed = ", ".join(entry.database for entry in entries)
        raise BackupError(f"{manifest_path} is damaged: it lists {listed}; expected each of "
                          f"{', '.join(BACKUP_ORDER)} once")
    for item in manifest.get("secrets") or []:
        path = source / str(item.get("file", ""))
        if item.get("file") != ADMIN_PASSWORD_FILE or not path.is_file() or _sha256(path) != item.get("sha256"):
            raise BackupError(f"{manifest_path} is damaged: secret file {item.get('file')!r} missing or altered")
    return entries


def restore(settings: Settings, *, source: Path) -> None:
    """Recreate every service database from ``source``: verified first, then all of them or none.

    Every dump goes into a staging database; only when all four restored does one transaction
    rename them into place. Any failure drops the staging databases and leaves the system as it was.
    """
    source = source.resolve()
    entries = sorted(verify(source), key=lambda e: RESTORE_ORDER.index(e.database))
    running = read_state(settings)
    if running is not None:  # before anything is started: its services may just be between connections
        raise BackupError(f"pms up is running from {settings.data_dir} (pid {running['pid']}); stop it and retry")
    with _server(settings), _progress() as progress:
        _refuse_running_system(settings)
        _drop_databases(settings, [d + STAGING_SUFFIX for d in RESTORE_ORDER] +
                        [d + REPLACED_SUFFIX for d in RESTORE_ORDER])  # leftovers of an interrupted restore
        task = progress.add_task("restore", total=len(entries) + 1)
        try:
            for entry in entries:
                progress.update(task, description=f"restoring {entry.database}")
                _restore_into_staging(settings, entry, source)
                progress.advance(task)
            progress.update(task, description="switching to the restored databases")
            _swap_in(settings, [entry.database for entry in entries])
            progress.advance(task)
        except BaseException as exc:
            try:
                _drop_databases(settings, [entry.database + STAGING_SUFFIX for entry in entries])
            except psycopg.Error:
                pass  # the server went away: the next restore drops the leftovers first
            if isinstance(exc, BackupError | psycopg.Error):  # e.g. a service connected during the swap
                raise BackupError(f"{exc}\nNothing was changed: every database is as it was before the restore.") \
                    from exc
            raise
        _drop_databases(settings, [entry.database + REPLACED_SUFFIX for entry in entries])
        if settings.mode is Mode.EMBEDDED:
            EmbeddedPostgres(settings).bootstrap()  # grants for the analyst role on the new tables
    _restore_admin_password(settings, source)
    console.print(f"[green]restored[/] {len(entries)} databases from {source}")


def _restore_into_staging(settings: Settings, entry: DumpEntry, source: Path) -> None:
    staging = entry.database + STAGING_SUFFIX
    owner = settings.server_url().username
    with psycopg.connect(_maintenance_dsn(settings), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(staging), sql.Identifier(owner)))
        # Like the bootstrap: only the roles granted below may connect (an external server has no bootstrap).
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(staging)))
        analyst = analyst_role(settings)
        if entry.database == "analytics" and conn.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", (analyst,)).fetchone():
            conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(staging), sql.Identifier(analyst)))
    url = settings.database_url_for(entry.database).set(database=staging)
    dsn, env = _client(url)
    use_list = _restorable_toc(source / entry.file)
    try:
        result = subprocess.run(
            [str(pg_bin("pg_restore")), "--no-owner", "--exit-on-error", "--single-transaction",
             f"--use-list={use_list}", f"--dbname={dsn}", str(source / entry.file)],
            capture_output=True, text=True, check=False, env=env,
        )
    finally:
        use_list.unlink(missing_ok=True)
    if result.returncode != 0:
        raise BackupError(f"pg_restore of {entry.database} failed: {result.stderr.strip()}")
    if entry.database == "patients":
        # Whatever the broker holds, the relay republishes the whole outbox after a restore: analytics (dumped
        # first) catches up on what patients got after its dump, and the topic gets every restored event.
        with psycopg.connect(libpq_dsn(url), autocommit=True) as conn:
            if conn.execute("SELECT to_regclass('patient_relay_state') IS NOT NULL").fetchone() == (True,):
                conn.execute("DELETE FROM patient_relay_state")


def _swap_in(settings: Settings, databases: list[str]) -> None:
    """Rename every staging database into place in ONE transaction: all swapped, or none."""
    with psycopg.connect(_maintenance_dsn(settings)) as conn:
        existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for database in databases:
            if database in existing:
                conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(database), sql.Identifier(database + REPLACED_SUFFIX)))
            conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                sql.Identifier(database + STAGING_SUFFIX), sql.Identifier(database)))
        conn.commit()


def _drop_databases(settings: Settings, databases: list[str]) -> None:
    with psycopg.connect(_maintenance_dsn(settings), autocommit=True) as conn:
        for database in databases:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))


def _restore_admin_password(settings: Settings, source: Path) -> None:
    """Install the backup's admin password when this data dir has none, and say where it is.

    Without it ``pms up`` would generate and print a new password that the restored admin
    account (which it never changes) does not have.
    """
    saved = source / ADMIN_PASSWORD_FILE
    target = settings.secrets_dir / ADMIN_PASSWORD_FILE
    if settings.mode is not Mode.EMBEDDED or not saved.is_file() or target.exists():
        return
    if not install_secret(target, saved.read_text()):
        return
    (settings.data_dir / ADMIN_SHOWN_MARKER).touch()
    console.print(f"the restored admin account keeps its password: it is in {target}")


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
    with psycopg.connect(libpq_dsn(settings.database_url_for("patients"))) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"


def _maintenance_dsn(settings: Settings) -> str:
    return libpq_dsn(settings.server_url().set(database="postgres", drivername="postgresql+psycopg"))


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


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console)
