"""The one Settings: precedence, nested variables, secrets policy, and the child-process round trip."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from pms.settings import (
    RENAMED_VARIABLES,
    Mode,
    Settings,
    UnknownSettingsError,
    check_environment,
    nested_variables,
    read_or_create_secret,
    to_env,
)

EXTERNAL_URL = "postgresql://pms:pw@db.example:5432/postgres"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No developer PMS_* variable leaks in; generated secrets land in tmp_path, not in ./.pms."""
    for key in list(os.environ):
        if key.startswith("PMS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PMS_DATA_DIR", str(tmp_path / "data"))
    yield


def _dotenv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / ".env"
    path.write_text(text)
    return path


def test_env_var_beats_dotenv_beats_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).patient.port == 4000  # type: ignore[call-arg]
    dotenv = _dotenv(tmp_path, "PMS_PATIENT__PORT=4100\nPMS_LOG_LEVEL=DEBUG\nPMS_AUTH__PORT=4105\n")
    from_file = Settings(_env_file=dotenv)  # type: ignore[call-arg]
    assert (from_file.patient.port, from_file.log_level, from_file.auth.port) == (4100, "DEBUG", 4105)
    monkeypatch.setenv("PMS_PATIENT__PORT", "4200")
    both = Settings(_env_file=dotenv)  # type: ignore[call-arg]
    assert both.patient.port == 4200  # the variable wins ...
    assert both.auth.port == 4105  # ... and the file still fills what the environment does not set
    assert both.patient.billing_timeout_s == 2.0  # untouched nested field keeps its default


def test_seed_ports_are_the_defaults() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    ports = {name: getattr(settings, name).port
             for name in ("gateway", "auth", "patient", "analytics", "billing", "dashboard", "postgres")}
    assert ports == {"gateway": 4004, "auth": 4005, "patient": 4000, "analytics": 4002, "billing": 9001,
                     "dashboard": 8501, "postgres": 5432}
    assert settings.bootstrap_servers == "127.0.0.1:9092"
    assert settings.kafka.topic == "patient"


def test_nested_variables_and_json_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PMS_JWT__TTL_S", "60")
    monkeypatch.setenv("PMS_KAFKA__TOPIC", "patient-test")
    monkeypatch.setenv("PMS_GATEWAY__CORS_ORIGINS", '["https://clinic.example"]')
    monkeypatch.setenv("PMS_PATIENT__SEED_DEMO_DATA", "false")
    monkeypatch.setenv("PMS_KAFKA_BOOTSTRAP_SERVERS", "kafka:9092")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.jwt.ttl_s == 60
    assert settings.kafka.topic == "patient-test"
    assert settings.gateway.cors_origins == ["https://clinic.example"]
    assert settings.patient.seed_demo_data is False
    assert settings.bootstrap_servers == "kafka:9092"  # the top-level override wins over kafka.bootstrap_servers


def test_bad_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PMS_PATIENT__PORT", "not-a-port")
    with pytest.raises(ValidationError, match=r"patient\.port"):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_embedded_mode_generates_a_private_stable_jwt_secret(tmp_path: Path) -> None:
    first = Settings(_env_file=None)  # type: ignore[call-arg]
    assert first.mode is Mode.EMBEDDED
    assert first.jwt.secret is not None and len(first.jwt.secret.get_secret_value()) >= 32
    key = tmp_path / "data" / "secrets" / "jwt.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert Settings(_env_file=None).jwt.secret == first.jwt.secret  # type: ignore[call-arg]


def test_external_mode_refuses_a_missing_jwt_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PMS_DATABASE_URL", EXTERNAL_URL)
    with pytest.raises(ValidationError, match="PMS_JWT__SECRET is required"):
        Settings(_env_file=None)  # type: ignore[call-arg]
    assert not (tmp_path / "data" / "secrets" / "jwt.key").exists(), "external mode must not invent a secret"


def test_short_jwt_secret_is_refused_in_every_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PMS_JWT__SECRET", "x" * 31)
    with pytest.raises(ValidationError, match="at least 32 bytes"):
        Settings(_env_file=None)  # type: ignore[call-arg]
    monkeypatch.setenv("PMS_DATABASE_URL", EXTERNAL_URL)
    with pytest.raises(ValidationError, match="at least 32 bytes"):
        Settings(_env_file=None)  # type: ignore[call-arg]
    monkeypatch.setenv("PMS_JWT__SECRET", "x" * 32)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.mode is Mode.EXTERNAL


def test_database_urls_per_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PMS_DATABASE_URL", EXTERNAL_URL)
    monkeypatch.setenv("PMS_JWT__SECRET", "s" * 40)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    url = settings.database_url_for("patients")
    assert (url.drivername, url.database, url.host, url.username) == ("postgresql+psycopg", "patients",
                                                                       "db.example", "pms")
    with pytest.raises(ValueError, match="unknown service database"):
        settings.database_url_for("postgres")
    assert "pw" not in repr(settings)  # secrets stay masked in reprs and logs


def test_to_env_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path / "elsewhere",
        database_url=SecretStr(EXTERNAL_URL),
        kafka_bootstrap_servers="kafka:9092",
        jwt={"secret": SecretStr("k" * 40), "ttl_s": 120},
        admin_password=SecretStr("admin-pw"),
        gateway={"port": 14004, "cors_origins": ["https://a.example", "https://b.example"]},
        patient={"seed_demo_data": False, "billing_timeout_s": 0.5},
        billing={"target": "billing:9001"},
    )
    env = to_env(original)
    assert env["PMS_JWT__SECRET"] == "k" * 40  # children get the real secret, not a mask
    assert env["PMS_DATA_DIR"] == str((tmp_path / "elsewhere").resolve())
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rebuilt = Settings(_env_file=None)  # type: ignore[call-arg]
    assert rebuilt.model_dump() == original.model_dump()


def test_read_or_create_secret_creates_once(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "secret"
    first = read_or_create_secret(path, nbytes=18)
    assert len(first) >= 24
    assert read_or_create_secret(path, nbytes=18) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_racing_creators_and_readers_all_see_one_whole_secret(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    for round_no in range(20):
        path = tmp_path / f"r{round_no}" / "secret"
        with ThreadPoolExecutor(8) as pool:
            seen = set(pool.map(lambda _i, path=path: read_or_create_secret(path, nbytes=18), range(16)))
        assert len(seen) == 1 and len(seen.pop()) >= 24  # never an empty or partial one
        assert [p.name for p in path.parent.iterdir()] == ["secret"]  # no temporary file left
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_every_nested_variable_a_child_gets_is_a_known_setting(tmp_path: Path) -> None:
    env = to_env(Settings(data_dir=tmp_path))
    check_environment(env)  # the supervisor's own children must never be refused
    assert {name for name in env if "__" in name} <= nested_variables()


@pytest.mark.parametrize(("variable", "message"), [
    ("PMS_PATIENT__OUTBOX_POLL_INTERVAL", "did you mean PMS_PATIENT__OUTBOX_POLL_INTERVAL_S?"),
    ("pms_jwt__secrt", "did you mean PMS_JWT__SECRET?"),  # names are case-insensitive, as pydantic-settings reads them
    ("PMS_NOSUCHSECTION__PORT", "PMS_NOSUCHSECTION__PORT is not a setting"),
    ("PMS_GATEWAY__REVOCATION_REFRESH_S", "was renamed PMS_JWT__REVOCATION_REFRESH_S"),
])
def test_an_unknown_nested_variable_is_refused_with_what_was_meant(variable: str, message: str) -> None:
    with pytest.raises(UnknownSettingsError, match=message.replace("?", r"\?")):
        check_environment({variable: "1", "PMS_PATIENT__PORT": "4000"})


#: Every single-underscore PMS_* name the project's own tools use that is not a setting (compose, db-init,
#: the bench, the tests, the notebooks' runner).
TOOL_VARIABLES = (
    "PMS_IMAGE", "PMS_POSTGRES_PASSWORD", "PMS_DB_APP_PASSWORD", "PMS_DB_ANALYST_PASSWORD", "PMS_DBINIT_SUPERUSER_URL",
    "PMS_SERVICE", "PMS_RESULT", "PMS_TEST_BACKEND", "PMS_TEST_SUPERVISOR", "PMS_BENCH_WRITE_TOTAL", "PMS_BENCH_BIG",
    "PMS_BENCH_PROFILE", "PMS_BENCH_PROFILE_IDLE", "PMS_BENCH_PROFILE_RATE", "PMS_KAFKA_PUBLISHED_PORT",
    "PMS_POSTGRES_PUBLISHED_PORT", "PMS_LOCALSTACK_PUBLISHED_PORT", "PMS_GATEWAY_PUBLISHED_PORT",
    "PMS_DASHBOARD_PUBLISHED_PORT",
)


def test_single_underscore_names_of_compose_db_init_and_the_bench_pass() -> None:
    check_environment({**dict.fromkeys(TOOL_VARIABLES, "1"), "OTHER__THING": "x", "PMS_LOG_LEVEL": "INFO"})


def test_no_pms_variable_the_project_itself_uses_is_refused() -> None:
    """Compose, db-init, the bench, CI and the fixtures set PMS_* names; none may look like a mistyped setting."""
    import re
    import subprocess

    root = Path(__file__).resolve().parents[2]
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    used: set[str] = set()
    for name in files:
        path = root / name
        code = path.suffix in {".py", ".yml", ".yaml", ".toml", ".cfg", ".sh"} or name in {"Makefile", "Dockerfile",
                                                                                          ".ci/run"}
        # The check's own docstrings and tests spell typos on purpose.
        deliberate_typos = name == "pms/settings.py" or (name.startswith("tests/") and path.name != "conftest.py")
        if code and not deliberate_typos and path.is_file():
            used |= set(re.findall(r"\bPMS_[A-Z0-9]+(?:_{1,2}[A-Z0-9]+)*\b", path.read_text(errors="replace")))
    assert len(used) > 50, sorted(used)  # the scan found the project's variables
    check_environment(dict.fromkeys(used - set(RENAMED_VARIABLES), "1"))


@pytest.mark.parametrize(("variable", "message"), [
    ("PMS_JWT_SECRET", "did you mean PMS_JWT__SECRET?"),  # one underscore for two: the key would be generated
    ("PMS_PATIENT_BILLING_TIMEOUT_S", "did you mean PMS_PATIENT__BILLING_TIMEOUT_S?"),
    ("PMS_LOGLEVEL", "did you mean PMS_LOG_LEVEL?"),
    ("pms_database_ulr", "did you mean PMS_DATABASE_URL?"),
    ("PMS_ADMIN_PASSWORD_FILE", "did you mean PMS_ADMIN_PASSWORD?"),  # no *_FILE convention here: say so
])
def test_a_single_underscore_name_that_plainly_mistypes_a_setting_is_refused(variable: str, message: str) -> None:
    with pytest.raises(UnknownSettingsError, match=message.replace("?", r"\?")):
        check_environment({variable: "1", "PMS_IMAGE": "pms:1"})


def test_a_mistyped_variable_in_the_dotenv_file_is_refused_too(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from pms.settings import get_settings

    _dotenv(tmp_path, "PMS_PATIENT__PORT=4100\nPMS_PATIENT__PROT=4200\n")
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    try:
        expected = r"PMS_PATIENT__PROT is not a setting \(did you mean PMS_PATIENT__PORT"
        with pytest.raises(UnknownSettingsError, match=expected):
            get_settings()
    finally:
        get_settings.cache_clear()
