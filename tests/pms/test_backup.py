"""Backup under write load and restore into a fresh data dir; damaged backups are refused."""

from __future__ import annotations

import json
import stat
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from pms import backup as pms_backup
from pms import db, process
from pms.embedded import EmbeddedPostgres, libpq_dsn
from pms.settings import PostgresSettings, Settings, read_or_create_secret
from pms.supervisor import ADMIN_PASSWORD_FILE, ADMIN_SHOWN_MARKER, state_path
from tests.fixtures.servers import ServerSet

pytestmark = pytest.mark.integration

TABLE = "backup_probe"


@pytest.fixture(scope="module")
def written_backup(servers: ServerSet, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[int]]:
    """A backup taken while a writer keeps inserting; returns it and the ids acknowledged before it began."""
    dsn = libpq_dsn(servers.settings.database_url_for("patients"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY)")
    acknowledged: list[int] = []
    stop = threading.Event()

    def writer() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            n = 0
            while not stop.is_set():
                n += 1
                conn.execute(f"INSERT INTO {TABLE} (id) VALUES (%s)", (n,))
                acknowledged.append(n)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    process.wait_until(lambda: len(acknowledged) >= 200, timeout=30, message="writes before the backup")
    before = set(acknowledged)
    read_or_create_secret(servers.settings.secrets_dir / ADMIN_PASSWORD_FILE, nbytes=18)  # as `pms up` makes it
    target = pms_backup.backup(servers.settings, to=tmp_path_factory.mktemp("backup") / "b1")
    stop.set()
    thread.join(timeout=10)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {TABLE}")
    return target, before


def test_manifest_lists_every_database_with_checksums(written_backup: tuple[Path, set[int]]) -> None:
    target, _ = written_backup
    entries = pms_backup.verify(target)
    assert {e.database for e in entries} == set(pms_backup.BACKUP_ORDER)
    assert all(len(e.sha256) == 64 and e.size > 0 for e in entries)


def test_restore_into_fresh_data_dir_has_every_acknowledged_row(
    written_backup: tuple[Path, set[int]], data_dir: Path
) -> None:
    target, before = written_backup
    fresh = Settings(_env_file=None, data_dir=data_dir,  # type: ignore[call-arg]
                     postgres=PostgresSettings(port=process.free_port()))
    pms_backup.restore(fresh, source=target)
    postgres = EmbeddedPostgres(fresh)
    postgres.start()
    try:
        with psycopg.connect(libpq_dsn(fresh.database_url_for("patients"))) as conn:
            restored = {row[0] for row in conn.execute(f"SELECT id FROM {TABLE}")}
        assert before <= restored
        # The analyst role can read analytics after a restore (grants re-applied).
        with psycopg.connect(libpq_dsn(fresh.analyst_url())) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        postgres.stop()


def test_damaged_dump_is_refused(written_backup: tuple[Path, set[int]], tmp_path: Path) -> None:
    target, _ = written_backup
    copy = tmp_path / "damaged"
    copy.mkdir()
    for item in target.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    dump = copy / "billing.dump"
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dump.write_bytes(bytes(data))
    with pytest.raises(pms_backup.BackupError, match=r"billing\.dump is damaged"):
        pms_backup.verify(copy)


def test_partial_backup_is_refused(written_backup: tuple[Path, set[int]], tmp_path: Path) -> None:
    target, _ = written_backup
    copy = tmp_path / "partial"
    copy.mkdir()
    for item in target.iterdir():
        if item.name != "auth.dump":
            (copy / item.name).write_bytes(item.read_bytes())
    with pytest.raises(pms_backup.BackupError, match=r"partial: auth\.dump is missing"):
        pms_backup.restore(Settings(_env_file=None, data_dir=tmp_path / "x"), source=copy)  # type: ignore[call-arg]
    (copy / "manifest.json").unlink()
    with pytest.raises(pms_backup.BackupError, match=r"no manifest\.json"):
        pms_backup.verify(copy)


@pytest.mark.parametrize("change", ["file outside", "database twice"])
def test_a_manifest_that_points_elsewhere_is_refused(written_backup: tuple[Path, set[int]], tmp_path: Path,
                                                     change: str) -> None:
    target, _ = written_backup
    copy = tmp_path / "edited"
    copy.mkdir()
    for item in target.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    if change == "file outside":
        (tmp_path / "auth.dump").write_bytes((copy / "auth.dump").read_bytes())
        next(e for e in manifest["databases"] if e["database"] == "auth")["file"] = "../auth.dump"
        expected = r"auth is stored as '\.\./auth\.dump'"
    else:
        manifest["databases"].append(manifest["databases"][0])
        expected = "expected each of"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(pms_backup.BackupError, match=expected):
        pms_backup.verify(copy)


def test_restore_refuses_while_pms_up_runs_on_the_data_dir(written_backup: tuple[Path, set[int]],
                                                            data_dir: Path) -> None:
    """Even at a moment when none of its services holds a connection."""
    target, _ = written_backup
    fresh = Settings(_env_file=None, data_dir=data_dir,  # type: ignore[call-arg]
                     postgres=PostgresSettings(port=process.free_port()))
    data_dir.mkdir(parents=True, exist_ok=True)
    me = psutil.Process()
    state_path(fresh).write_text(json.dumps({"pid": me.pid, "create_time": me.create_time(), "services": []}))
    with pytest.raises(pms_backup.BackupError, match=rf"pms up is running from .* \(pid {me.pid}\)"):
        pms_backup.restore(fresh, source=target)
    assert not (data_dir / "postgres").exists()  # refused before anything was started


def test_restore_refuses_a_running_system(written_backup: tuple[Path, set[int]], servers: ServerSet) -> None:
    target, _ = written_backup
    with psycopg.connect(libpq_dsn(servers.settings.database_url_for("auth"))), \
            pytest.raises(pms_backup.BackupError, match="the system is running"):
        pms_backup.restore(servers.settings, source=target)


def test_a_backup_is_readable_by_its_owner_only_and_keeps_the_admin_password(
        written_backup: tuple[Path, set[int]], servers: ServerSet) -> None:
    target, _ = written_backup
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert {stat.S_IMODE(item.stat().st_mode) for item in target.iterdir()} == {0o600}
    saved = (target / ADMIN_PASSWORD_FILE).read_text()
    assert saved == (servers.settings.secrets_dir / ADMIN_PASSWORD_FILE).read_text()


def test_dumps_go_analytics_first_and_no_password_is_on_a_command_line(
        servers: ServerSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Analytics first, so it is never ahead of patients (see pms.backup); ``ps`` shows every argv."""
    calls: list[list[str]] = []
    real_run = subprocess.run

    def recording_run(args: list[str], **kwargs: Any) -> Any:
        calls.append([str(a) for a in args])
        return real_run(args, **kwargs)

    monkeypatch.setattr(pms_backup.subprocess, "run", recording_run)
    pms_backup.backup(servers.settings, to=tmp_path / "b")
    dumped = [arg.rsplit("/", 1)[-1] for call in calls if call[0].endswith("pg_dump")
              for arg in call if arg.startswith("--dbname=")]
    assert dumped == ["analytics", "patients", "billing", "auth"]
    password = servers.settings.database_url_for("patients").password
    assert password and not any(password in arg for call in calls for arg in call)


def test_a_restore_that_fails_changes_nothing_and_the_relay_republishes_after_one(
    written_backup: tuple[Path, set[int]], servers: ServerSet, data_dir: Path, tmp_path: Path,
) -> None:
    """A dump that cannot be restored here (its GRANT names a role this server lacks) fails the restore
    after patients was already restored: nothing is swapped in, no staging database is left."""
    good, before = written_backup
    source = servers.settings
    db.migrate(source, "patients")  # the relay's state table
    dsn = libpq_dsn(source.database_url_for("patients"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO patient_relay_state (topic, partition, high_watermark) VALUES ('t', 0, 5)"
                     " ON CONFLICT DO NOTHING")
    ghost = f"ghost_{uuid.uuid4().hex[:8]}"
    superuser = libpq_dsn(servers.postgres.superuser_url("billing")) if servers.postgres else None
    if superuser is None:
        pytest.skip("needs the embedded server's superuser to create a role")
    billing = libpq_dsn(source.database_url_for("billing"))
    with psycopg.connect(superuser, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {ghost}")
    with psycopg.connect(billing, autocommit=True) as conn:  # as the app role, like every billing table
        conn.execute(f"CREATE TABLE {ghost}_t (id int)")
        conn.execute(f"GRANT SELECT ON {ghost}_t TO {ghost}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {ghost}_p (id int)")  # marks this backup's patients database
    try:
        bad = pms_backup.backup(source, to=tmp_path / "bad")
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE {ghost}_p")
        with psycopg.connect(billing, autocommit=True) as conn:
            conn.execute(f"DROP TABLE {ghost}_t")
        with psycopg.connect(superuser, autocommit=True) as conn:
            conn.execute(f"DROP ROLE {ghost}")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM patient_relay_state WHERE topic = 't'")

    fresh = Settings(_env_file=None, data_dir=data_dir,  # type: ignore[call-arg]
                     postgres=PostgresSettings(port=process.free_port()))
    pms_backup.restore(fresh, source=good)
    refused = rf"(?s)pg_restore of billing failed.*{ghost}.*Nothing was changed"
    with pytest.raises(pms_backup.BackupError, match=refused):
        pms_backup.restore(fresh, source=bad)
    postgres = EmbeddedPostgres(fresh)
    postgres.start()
    try:
        with psycopg.connect(libpq_dsn(fresh.database_url_for("patients"))) as conn:
            assert before <= {row[0] for row in conn.execute(f"SELECT id FROM {TABLE}")}  # the good restore's
            assert conn.execute(f"SELECT to_regclass('{ghost}_p')").fetchone() == (None,)  # not the bad one's
        with psycopg.connect(libpq_dsn(postgres.superuser_url())) as conn:
            names = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        assert not any(pms_backup.STAGING_SUFFIX in n or pms_backup.REPLACED_SUFFIX in n for n in names)
    finally:
        postgres.stop()
    # The bad backup's patients (with relay state) restore fine on their own: the state is cleared.
    (bad / "billing.dump").write_bytes((good / "billing.dump").read_bytes())
    manifest = json.loads((bad / "manifest.json").read_text())
    good_billing = next(e for e in json.loads((good / "manifest.json").read_text())["databases"]
                        if e["database"] == "billing")
    manifest["databases"] = [good_billing if e["database"] == "billing" else e for e in manifest["databases"]]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    pms_backup.restore(fresh, source=bad)
    postgres.start()
    try:
        with psycopg.connect(libpq_dsn(fresh.database_url_for("patients"))) as conn:
            assert conn.execute(f"SELECT to_regclass('{ghost}_p') IS NOT NULL").fetchone() == (True,)
            assert conn.execute("SELECT count(*) FROM patient_relay_state").fetchone() == (0,)
    finally:
        postgres.stop()


def test_a_connection_that_blocks_the_swap_changes_nothing_and_says_so(
        written_backup: tuple[Path, set[int]], data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service connecting during the restore makes the renames fail: rolled back, staging dropped."""
    target, _ = written_backup
    fresh = Settings(_env_file=None, data_dir=data_dir,  # type: ignore[call-arg]
                     postgres=PostgresSettings(port=process.free_port()))
    real_swap = pms_backup._swap_in

    def swap_with_a_visitor(settings: Settings, databases: list[str]) -> None:
        with psycopg.connect(libpq_dsn(settings.database_url_for("billing"))):
            real_swap(settings, databases)

    monkeypatch.setattr(pms_backup, "_swap_in", swap_with_a_visitor)
    with pytest.raises(pms_backup.BackupError, match=r"(?s)being accessed by other users.*Nothing was changed"):
        pms_backup.restore(fresh, source=target)
    monkeypatch.setattr(pms_backup, "_swap_in", real_swap)
    postgres = EmbeddedPostgres(fresh)
    postgres.start()
    try:
        with psycopg.connect(libpq_dsn(fresh.database_url_for("patients"))) as conn:
            assert conn.execute(f"SELECT to_regclass('{TABLE}')").fetchone() == (None,)  # still the empty one
        with psycopg.connect(libpq_dsn(postgres.superuser_url())) as conn:
            names = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        assert not any(pms_backup.STAGING_SUFFIX in n for n in names)
    finally:
        postgres.stop()


def test_a_restore_into_a_fresh_data_dir_keeps_the_admin_password(
        written_backup: tuple[Path, set[int]], data_dir: Path) -> None:
    target, _ = written_backup
    fresh = Settings(_env_file=None, data_dir=data_dir,  # type: ignore[call-arg]
                     postgres=PostgresSettings(port=process.free_port()))
    pms_backup.restore(fresh, source=target)
    installed = fresh.secrets_dir / ADMIN_PASSWORD_FILE
    assert installed.read_text() == (target / ADMIN_PASSWORD_FILE).read_text()
    assert stat.S_IMODE(installed.stat().st_mode) == 0o600
    assert (fresh.data_dir / ADMIN_SHOWN_MARKER).exists()  # `pms up` says where it is, prints no new one


def test_a_server_that_refuses_the_login_is_a_clear_error(written_backup: tuple[Path, set[int]],
                                                            servers: ServerSet, data_dir: Path) -> None:
    """Another cluster holds the port (here: the session's): its passwords are not this data dir's."""
    target, _ = written_backup
    other = Settings(_env_file=None, data_dir=data_dir,  # type: ignore[call-arg]
                     postgres=PostgresSettings(host=servers.settings.postgres.host,
                                               port=servers.settings.postgres.port))
    with pytest.raises(pms_backup.BackupError, match=r"cannot use PostgreSQL at .*PMS_POSTGRES__PORT"):
        pms_backup.restore(other, source=target)
    with pytest.raises(pms_backup.BackupError, match=r"cannot use PostgreSQL at"):
        pms_backup.backup(other, to=data_dir.parent / "never")
    assert not any((data_dir.parent / "never").iterdir())
