"""Backup under write load and restore into a fresh data dir; damaged backups are refused."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest

from pms import backup as pms_backup
from pms import process
from pms.embedded import EmbeddedPostgres, libpq_dsn
from pms.settings import PostgresSettings, Settings
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


def test_restore_refuses_a_running_system(written_backup: tuple[Path, set[int]], servers: ServerSet) -> None:
    target, _ = written_backup
    with psycopg.connect(libpq_dsn(servers.settings.database_url_for("auth"))), \
            pytest.raises(pms_backup.BackupError, match="the system is running"):
        pms_backup.restore(servers.settings, source=target)
