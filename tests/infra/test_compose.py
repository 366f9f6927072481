"""docker-compose.yml and .env.example: parse, agree with the registry, keep secrets out.

No Docker engine runs here, so these are the static checks that stand in for
`docker compose config`: the file is what ``infra.compose`` generates from
``pms.registry.SERVICES`` and it wires every service the way the settings expect.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from infra import compose
from pms.registry import SERVICES, ServiceSpec, by_name, start_order
from pms.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
INFRASTRUCTURE = {"postgres", "kafka", "localstack"}


@pytest.fixture(scope="module")
def doc() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_committed_file_is_what_the_registry_generates() -> None:
    assert (ROOT / "docker-compose.yml").read_text() == compose.render(), (
        "docker-compose.yml drifted from pms/registry.py: run `python -m infra.compose`"
    )
    assert compose.main(["--check"]) == 0


def test_check_mode_fails_on_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "docker-compose.yml"
    stale.write_text(compose.render().replace("[serve, auth]", "[serve, oops]"))
    monkeypatch.setattr(compose, "COMPOSE_FILE", stale)
    assert compose.main(["--check"]) == 1
    monkeypatch.setattr(compose, "COMPOSE_FILE", tmp_path / "missing.yml")
    assert compose.main(["--check"]) == 1


def test_services_are_exactly_the_registry_plus_infrastructure(doc: dict) -> None:
    assert set(doc["services"]) == {s.name for s in SERVICES} | INFRASTRUCTURE


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: s.name)
def test_each_service_runs_the_one_image_with_pms_serve(doc: dict, spec: ServiceSpec) -> None:
    service = doc["services"][spec.name]
    assert service["image"] == "${PMS_IMAGE:-pms:latest}"
    assert service["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    assert service["command"] == ["serve", spec.name]
    assert service["healthcheck"]["test"] == ["CMD", "python", "-m", "infra.healthcheck", spec.name]
    assert service["networks"] == ["pms"]
    assert service["init"] is True


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: s.name)
def test_dependencies_wait_for_healthy(doc: dict, spec: ServiceSpec) -> None:
    depends = doc["services"][spec.name].get("depends_on", {})
    expected = set(spec.depends_on)
    if spec.databases:
        expected.add("postgres")
    if spec.needs_broker:
        expected.add("kafka")
    assert set(depends) == expected
    assert all(cond == {"condition": "service_healthy"} for cond in depends.values())
    # Everything depended on has a healthcheck, or service_healthy would never be met.
    for name in depends:
        assert "healthcheck" in doc["services"][name], name


def test_every_database_user_waits_for_postgres_directly_or_transitively(doc: dict) -> None:
    def reaches(name: str, target: str) -> bool:
        deps = doc["services"][name].get("depends_on", {})
        return target in deps or any(reaches(dep, target) for dep in deps)

    for spec in start_order():
        if spec.databases or spec.name == "analytics":
            assert reaches(spec.name, "postgres"), spec.name


def test_only_public_services_publish_ports(doc: dict) -> None:
    for spec in SERVICES:
        ports = doc["services"][spec.name].get("ports", [])
        if spec.public:
            port = Settings.model_fields[spec.section].default.port
            assert ports == [f"${{PMS_{spec.name.upper()}_PUBLISHED_PORT:-{port}}}:{port}"]
        else:
            assert ports == []
    # Infrastructure is published on loopback only.
    for name in INFRASTRUCTURE:
        assert all(p.startswith("127.0.0.1:") for p in doc["services"][name]["ports"]), name


def test_environment_binds_all_interfaces_and_addresses_services_by_name(doc: dict) -> None:
    env = doc["services"]["patient"]["environment"]
    assert env["PMS_PATIENT__HOST"] == "0.0.0.0"
    assert env["PMS_PATIENT__PORT"] == "4000"
    assert env["PMS_BILLING__TARGET"] == "billing:9001"
    assert env["PMS_AUTH__URL"] == "http://auth:4005"
    assert env["PMS_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["PMS_DATABASE_URL"].endswith("@postgres:5432/postgres")
    assert env["PMS_ANALYST_DATABASE_URL"].startswith("postgresql+psycopg://pms_analyst:")
    for spec in SERVICES:
        assert env[spec.port_setting] == str(Settings.model_fields[spec.section].default.port)
        assert env[f"PMS_{spec.section.upper()}__HOST"] == "0.0.0.0"
    # Every container sees the same addresses; only the proxy-trust setting differs.
    envs = [{k: v for k, v in doc["services"][s.name]["environment"].items() if k != "PMS_FORWARDED_ALLOW_IPS"}
            for s in SERVICES]
    assert all(e == envs[0] for e in envs)


def test_only_unpublished_services_trust_forwarded_headers(doc: dict) -> None:
    """Auth limits failed logins per client address: it must see the client the gateway names, while a
    published container must not let any caller name its own address."""
    for spec in SERVICES:
        env = doc["services"][spec.name]["environment"]
        if spec.public:
            assert "PMS_FORWARDED_ALLOW_IPS" not in env and "ports" in doc["services"][spec.name]
        else:
            assert env["PMS_FORWARDED_ALLOW_IPS"] == "*" and "ports" not in doc["services"][spec.name]


def test_environment_is_understood_by_settings(doc: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Feed the compose environment (secrets filled in) to the real Settings, as a container would."""
    env = doc["services"]["gateway"]["environment"]
    fills = {"PMS_DB_APP_PASSWORD": "apppw", "PMS_DB_ANALYST_PASSWORD": "anapw",
             "PMS_JWT__SECRET": "x" * 40, "PMS_ADMIN_PASSWORD": "adminpw"}

    def expand(value: str) -> str:
        def one(match: re.Match[str]) -> str:
            name, _, default = match.group(1).partition(":")
            return fills.get(name, default.removeprefix("-") if default.startswith("-") else "")
        return re.sub(r"\$\{([^}]+)\}", one, value)

    for key, value in env.items():
        monkeypatch.setenv(key, expand(value))
    monkeypatch.setenv("PMS_DATA_DIR", str(tmp_path))
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.mode.value == "external"
    assert settings.database_url_for("patients").render_as_string(hide_password=False) == (
        "postgresql+psycopg://pms:apppw@postgres:5432/patients"
    )
    assert settings.analyst_url().database == "analytics"
    assert settings.billing.address == "billing:9001"
    assert settings.patient.base_url == "http://patient:4000"
    assert settings.gateway.base_url == "http://gateway:4004"
    assert settings.bootstrap_servers == "kafka:9092"
    for spec in SERVICES:
        assert spec.host(settings) == "0.0.0.0"
    assert not (tmp_path / "secrets").exists(), "external mode must not generate secrets"


def test_infrastructure_healthchecks_volumes_and_network(doc: dict) -> None:
    services = doc["services"]
    assert services["postgres"]["image"] == "postgres:18"
    assert "./docker/postgres:/docker-entrypoint-initdb.d:ro" in services["postgres"]["volumes"]
    assert (ROOT / "docker" / "postgres" / "10-pms-databases.sh").exists()
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert services["localstack"]["image"].startswith("localstack/localstack:")
    named_volumes = set(doc["volumes"])
    for name in INFRASTRUCTURE:
        assert services[name]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
        assert services[name]["networks"] == ["pms"]
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert source.startswith("./") or source in named_volumes, volume
    assert list(doc["networks"]) == ["pms"]


def test_no_secret_is_written_into_the_compose_file(doc: dict) -> None:
    for name, service in doc["services"].items():
        for key, value in service.get("environment", {}).items():
            if any(word in key for word in ("PASSWORD", "SECRET", "TOKEN", "DATABASE_URL")):
                assert "${" in value, f"{name}.{key} must come from .env"


def test_env_example_covers_every_required_variable_with_placeholders() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    example = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            example[key] = value
    assert required <= set(example), required - set(example)
    for key in required:
        if "PASSWORD" in key or "SECRET" in key:
            assert example[key].startswith("change-me"), key
    assert len(example["PMS_JWT__SECRET"].encode()) >= 32


def test_registry_ports_are_distinct() -> None:
    ports = [Settings.model_fields[s.section].default.port for s in SERVICES]
    assert len(ports) == len(set(ports))
    assert by_name("gateway").public and by_name("dashboard").public
