"""`pms replay` with nothing to talk to: one line saying what is missing and exit 1, never a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from pms import process
from pms.cli import app
from pms.settings import get_settings


@pytest.fixture
def nothing_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    closed = process.free_port()
    env = {"PMS_DATA_DIR": str(tmp_path / "data"), "PMS_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{closed}",
           "PMS_DATABASE_URL": f"postgresql+psycopg://pms:pw@127.0.0.1:{process.free_port()}/postgres",
           "PMS_JWT__SECRET": "k" * 40}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield env
    get_settings.cache_clear()


def _said(result: Result) -> str:
    """The output as one line (rich wraps at the terminal width)."""
    return " ".join(result.output.split())


def test_replay_without_a_broker_says_so(nothing_running: dict[str, str]) -> None:
    result = CliRunner().invoke(app, ["replay"])
    assert result.exit_code == 1, result.output
    assert "did not answer" in _said(result) and nothing_running["PMS_KAFKA_BOOTSTRAP_SERVERS"] in _said(result)
    assert "Traceback" not in result.output


def test_replay_failures_and_a_missing_database_say_so(nothing_running: dict[str, str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from api.patient import replay as patient_replay

    monkeypatch.setattr(patient_replay, "ensure_topic", lambda *_a, **_k: False)  # a broker that answers
    result = CliRunner().invoke(app, ["replay"])
    assert result.exit_code == 1, result.output
    assert "cannot read the outbox from PostgreSQL at 127.0.0.1" in _said(result)
    assert ":pw@" not in result.output

    def undelivered(*_a: object, **_k: object) -> int:
        raise patient_replay.ReplayFailed("3 of 10 events were not delivered")

    monkeypatch.setattr(patient_replay, "run", undelivered)
    result = CliRunner().invoke(app, ["replay"])
    assert result.exit_code == 1 and "3 of 10 events were not delivered" in _said(result)
    assert "safe to repeat" in _said(result)


@pytest.mark.parametrize(("args", "code", "said"), [
    (["serve", "bogus"], 2, "unknown service 'bogus'; known services: billing, auth, patient"),
    (["serve", "x[/]"], 2, "unknown service 'x[/]'"),  # typed text printed as it is, never as Rich markup
    (["migrate", "[bold]x[/]"], 2, "unknown database '[bold]x[/]'"),
    (["restore", "/nonexistent/x[/]"], 1, "/nonexistent/x[/] does not exist or is not a folder"),
    (["migrate", "bogus"], 2, "unknown database 'bogus'; one of auth, patients, billing, analytics"),
    (["backup", "--to", "/proc/pms-no/such"], 1, "cannot create /proc/pms-no/such"),
    (["restore", "/nonexistent/pms-backup"], 1, "/nonexistent/pms-backup does not exist or is not a folder"),
    (["export", "--to", "/proc/pms-no/such"], 1, "cannot write to /proc/pms-no/such"),
])
def test_a_wrong_name_or_folder_is_one_line_not_a_traceback(nothing_running: dict[str, str], args: list[str],
                                                             code: int, said: str) -> None:
    """Found by exploratory testing: each of these printed a KeyError or FileNotFoundError traceback."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, result.output
    assert said in _said(result)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(("created", "said"), [
    (300, "created 300 patient(s)"),
    (0, "created 0 patient(s); 300 skipped: their e-mail is already used (the same --seed makes the same"),
])
def test_seed_says_how_many_it_created_and_why_others_were_skipped(nothing_running: dict[str, str],
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  created: int, said: str) -> None:
    """Exploratory testing: a second run with the same seed showed 300/300 and nothing else, having added nobody."""
    from api.patient import seed as patient_seed

    monkeypatch.setattr(patient_seed, "run", lambda *_args, **_kwargs: created)
    result = CliRunner().invoke(app, ["seed", "--patients", "300"])
    assert result.exit_code == 0, result.output
    assert said in _said(result)
    assert ("skipped" in result.output) is (created < 300)
