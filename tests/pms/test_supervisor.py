"""The supervisor behind ``pms up`` / ``pms status``, run as a real process over stand-in services.

The real services are written elsewhere, so these tests give the supervisor a tiny registry
of stand-ins (tests/pms/fake_service.py) and otherwise run it for real: embedded PostgreSQL
and Tansu (or the session's servers in external mode, where the test is about the services),
real child processes, real signals, and psutil to prove nothing is left behind.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest
from pydantic import SecretStr, ValidationError
from rich.console import Console

from pms import process
from pms.embedded import libpq_dsn
from pms.registry import Kind, Probe, ServiceSpec
from pms.settings import KafkaSettings, PostgresSettings, Settings, SupervisorSettings, to_env
from pms.supervisor import (
    ADMIN_PASSWORD_FILE,
    EXIT_FAILED,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_USAGE,
    RestartPolicy,
    Supervisor,
    print_status,
    read_state,
    select_services,
    state_path,
)
from tests.fixtures.servers import ServerSet
from tests.pms.fake_service import CRASH_EXIT_CODE, CRASH_MESSAGE
from tests.pms.supervisor_harness import CONFIG_ENV, fake_specs

pytestmark = pytest.mark.integration

#: billing (gRPC) <- patient <- gateway, and auth on its own: the shape of the real registry.
STACK = [
    {"name": "billing", "mode": "grpc", "section": "billing", "probe": "grpc"},
    {"name": "auth", "mode": "http", "section": "auth"},
    {"name": "patient", "mode": "http", "section": "patient", "depends_on": ["billing"]},
    {"name": "gateway", "mode": "http", "section": "gateway", "depends_on": ["auth", "patient"]},
]
FAST_POLICY = {"max_restarts": 2, "window_s": 60.0, "backoff_initial_s": 0.05, "backoff_max_s": 0.2}
#: The same policy as settings (PMS_SUPERVISOR__*), the way `pms up` gets it.
FAST_SETTINGS = {"max_restarts": 2, "restart_window_s": 60.0, "backoff_initial_s": 0.05, "backoff_max_s": 0.2}


def _ports() -> dict[str, Any]:
    return {section: {"port": process.free_port()}
            for section in ("patient", "auth", "gateway", "analytics", "billing", "dashboard", "pipeline")}


def embedded_settings(data_dir: Path) -> Settings:
    """Embedded mode on a data dir of its own: the supervisor starts PostgreSQL and Tansu."""
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=data_dir,
        postgres=PostgresSettings(port=process.free_port()),
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{process.free_port()}"),
        **_ports(),
    )


def external_settings(servers: ServerSet, data_dir: Path, **overrides: Any) -> Settings:
    """External mode on the session's servers: the supervisor starts services only."""
    base = servers.settings
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=data_dir,
        database_url=SecretStr(base.server_url().render_as_string(hide_password=False)),
        analyst_database_url=SecretStr(base.analyst_url().render_as_string(hide_password=False)),
        kafka_bootstrap_servers=base.bootstrap_servers,
        jwt={"secret": SecretStr("supervisor-test-secret-" + "x" * 32)},
        admin_password=SecretStr("configured-admin-password"),
        **_ports(),
        **overrides,
    )


class SupervisorRun:
    """``python -m tests.pms.supervisor_harness`` as a child of the test, output in a file."""

    def __init__(self, settings: Settings, config: dict[str, Any], out: Path) -> None:
        self.settings = settings
        self.out = out
        env = {k: v for k, v in os.environ.items() if not k.startswith("PMS_")}
        env.update(to_env(settings))
        env[CONFIG_ENV] = json.dumps(config)
        self.proc = process.spawn([sys.executable, "-m", "tests.pms.supervisor_harness"], log_path=out, env=env)

    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def state(self) -> dict[str, Any] | None:
        try:
            return json.loads(state_path(self.settings).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def service(self, name: str) -> dict[str, Any]:
        state = self.state() or {}
        return next((s for s in state.get("services", []) if s["name"] == name), {})

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        def all_ready() -> bool:
            state = self.state()
            return bool(state and state["services"] and all(s["state"] == "ready" for s in state["services"])
                        and "Admin login:" in self.output())  # the summary's last line

        try:
            process.wait_until(all_ready, timeout=timeout, interval=0.1, message="all services ready",
                               alive=self.alive)
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\n--- supervisor output ---\n{self.output()}") from exc
        state = self.state()
        assert state is not None
        return state

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60.0) -> int:
        self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"supervisor did not exit\n{self.output()}") from exc

    def kill(self) -> None:
        """Test cleanup: kill the harness's whole tree, whatever state it is in."""
        if self.alive():
            tree = self.descendants()
            process.stop(self.proc, sig=signal.SIGTERM, timeout=30)
            for child in tree:
                try:
                    child.kill()
                except psutil.Error:
                    pass


@pytest.fixture
def run_supervisor(tmp_path: Path) -> Iterator[Any]:
    runs: list[SupervisorRun] = []

    def _run(settings: Settings, config: dict[str, Any]) -> SupervisorRun:
        run = SupervisorRun(settings, config, tmp_path / f"supervisor-{len(runs)}.out")
        runs.append(run)
        return run

    yield _run
    for run in runs:
        run.kill()


def _names(procs: list[psutil.Process]) -> list[str]:
    """Names of those still running: a PostgreSQL backend whose connection just closed exits between the
    listing and the read (this failed the test once in a while: NoSuchProcess from ``name()``)."""
    names = []
    for proc in procs:
        try:
            names.append(proc.name())
        except psutil.NoSuchProcess:
            pass
    return names


def _alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} {proc.name()}")
        except psutil.NoSuchProcess:
            pass
    return left


def _status(settings: Settings) -> tuple[int, str]:
    buffer = io.StringIO()
    code = print_status(settings, console=Console(file=buffer, width=200, color_system=None))
    return code, buffer.getvalue()


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# -- embedded: the whole lifecycle ---------------------------------------------------------------


@pytest.mark.slow
def test_up_then_sigint_leaves_nothing_and_a_restart_keeps_the_data(data_dir: Path, run_supervisor: Any) -> None:
    """One embedded lifecycle (it costs an initdb): start, inspect, Ctrl-C, start again."""
    settings = embedded_settings(data_dir)
    run = run_supervisor(settings, {"services": STACK, "policy": FAST_POLICY})
    state = run.wait_ready()

    assert [s["name"] for s in state["services"]] == ["billing", "auth", "patient", "gateway"]
    assert set(state["servers"]) == {"postgres", "broker"}
    code, table = _status(settings)
    assert code == EXIT_OK, table
    for name in ("postgres", "broker", "billing", "auth", "patient", "gateway"):
        assert name in table

    out = run.output()
    password = (settings.secrets_dir / ADMIN_PASSWORD_FILE).read_text().strip()
    assert len(password) >= 20
    assert f"{settings.admin_email} / {password}" in out
    app_password = (settings.secrets_dir / "postgres-app.password").read_text().strip()
    assert f"postgresql://pms@127.0.0.1:{settings.postgres.port}/postgres" in out
    assert app_password not in out
    assert f"http://127.0.0.1:{settings.gateway.port}/api-docs/patient" in out
    assert f"127.0.0.1:{settings.billing.port}" in out
    assert "Traceback" not in out and "RuntimeDirWarning" not in out

    # Children see the supervisor's configuration and secrets, including the generated admin password.
    config = httpx.get(f"http://127.0.0.1:{settings.auth.port}/config", timeout=5).json()
    assert config["jwt"] == _sha(settings.jwt.secret.get_secret_value())  # type: ignore[union-attr]
    assert config["admin"] == _sha(password)
    assert config["data_dir"] == str(settings.data_dir.resolve())
    assert (settings.logs_dir / "auth.log").read_text().startswith("fake http service listening")

    with psycopg.connect(libpq_dsn(settings.database_url_for("patients")), autocommit=True) as conn:
        conn.execute("CREATE TABLE survivor (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO survivor VALUES (1, 'still here')")

    # A crashed PostgreSQL is restarted by the same policy as the services (and recovers its WAL).
    old_pg = state["servers"]["postgres"]["pid"]
    os.kill(old_pg, signal.SIGKILL)
    process.wait_until(lambda: (run.state() or {}).get("servers", {}).get("postgres", {}).get("pid", old_pg)
                       != old_pg, timeout=60, message="postgres restarted", alive=run.alive)
    assert f"postgres (pid {old_pg}) was killed by SIGKILL" in run.output()
    with psycopg.connect(libpq_dsn(settings.database_url_for("patients"))) as conn:
        assert conn.execute("SELECT count(*) FROM survivor").fetchone() == (1,)

    tree = run.descendants()
    names = " ".join(_names(tree))
    assert "postgres" in names and "tansu" in names and "python" in names, names

    assert run.stop(signal.SIGINT) == EXIT_OK, run.output()
    assert _alive(tree) == []
    assert not state_path(settings).exists()
    for port in (settings.postgres.port, settings.auth.port, settings.billing.port, settings.gateway.port):
        assert not process.port_in_use("127.0.0.1", port)
    assert _status(settings)[0] == EXIT_NOT_RUNNING

    second = run_supervisor(settings, {"services": STACK[:2]})
    second.wait_ready()
    with psycopg.connect(libpq_dsn(settings.database_url_for("patients"))) as conn:
        assert conn.execute("SELECT note FROM survivor WHERE id = 1").fetchone() == ("still here",)
    out = second.output()
    assert password not in out  # printed in full on the first start only ...
    assert str(settings.secrets_dir / ADMIN_PASSWORD_FILE) in out  # ... afterwards: where it is
    config = httpx.get(f"http://127.0.0.1:{settings.auth.port}/config", timeout=5).json()
    assert config["admin"] == _sha(password)  # the same generated password still reaches auth
    tree = second.descendants()
    assert second.stop(signal.SIGTERM) == EXIT_OK, second.output()
    assert _alive(tree) == []


# -- external mode (the session's servers): services only ---------------------------------------------


def test_crashing_child_is_restarted_then_supervisor_gives_up(
    servers: ServerSet, tmp_path: Path, run_supervisor: Any
) -> None:
    settings = external_settings(servers, tmp_path / "data", supervisor=FAST_SETTINGS)
    services = [STACK[1], {"name": "patient", "mode": "crash", "section": "patient"}]
    run = run_supervisor(settings, {"services": services})  # the policy comes from settings.supervisor
    code = run.wait(timeout=60)
    out = run.output()

    assert code == EXIT_FAILED, out
    assert f"exited with code {CRASH_EXIT_CODE}" in out and "error: patient (pid " in out
    # the log tail is shown at every death, each time only what that run wrote
    assert out.count(CRASH_MESSAGE) == 1 + FAST_POLICY["max_restarts"]
    assert "restarting patient" in out
    assert "giving up" in out
    # first start + max_restarts restarts, then no more
    log = (settings.logs_dir / "patient.log").read_text()
    assert log.count(CRASH_MESSAGE) == 1 + FAST_POLICY["max_restarts"]
    assert not process.port_in_use("127.0.0.1", settings.auth.port), "auth was left running"
    assert not state_path(settings).exists()


def test_killed_child_is_restarted_and_only_starts_what_is_needed(
    servers: ServerSet, tmp_path: Path, run_supervisor: Any
) -> None:
    settings = external_settings(servers, tmp_path / "data")
    run = run_supervisor(settings, {"services": STACK, "only": ["patient"], "policy": FAST_POLICY})
    state = run.wait_ready()
    assert [s["name"] for s in state["services"]] == ["billing", "patient"]
    assert not (settings.logs_dir / "gateway.log").exists()
    assert "with the password from PMS_ADMIN_PASSWORD" in run.output()
    assert "configured-admin-password" not in run.output()

    # A second supervisor on the same data dir refuses instead of fighting over ports.
    buffer = io.StringIO()
    second = Supervisor(settings, services=fake_specs(STACK), console=Console(file=buffer, width=200))
    assert second.run() == EXIT_FAILED
    assert "already running" in buffer.getvalue()
    assert state_path(settings).exists(), "the refused supervisor removed the running one's state"

    old_pid = run.service("patient")["pid"]
    os.kill(old_pid, signal.SIGKILL)
    process.wait_until(
        lambda: run.service("patient").get("restarts") == 1 and run.service("patient").get("state") == "ready",
        timeout=30, message="patient restarted", alive=run.alive,
    )
    assert run.service("patient")["pid"] != old_pid
    assert f"patient (pid {old_pid}) was killed by SIGKILL" in run.output()
    assert _status(settings)[0] == EXIT_OK
    tree = run.descendants()
    assert run.stop(signal.SIGHUP) == EXIT_OK, run.output()  # a closed terminal is a clean stop too
    assert _alive(tree) == []


def test_a_closed_terminal_still_stops_everything_cleanly(servers: ServerSet, tmp_path: Path) -> None:
    """SIGHUP, and every write to the terminal failing from then on (here: the reading end of the pipe is
    closed, EPIPE; a closed terminal gives EIO). The status line before stopping must not end the shutdown."""
    settings = external_settings(servers, tmp_path / "data")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PMS_")}
    env.update(to_env(settings))
    env[CONFIG_ENV] = json.dumps({"services": STACK, "only": ["patient"], "policy": FAST_POLICY})
    proc = subprocess.Popen([sys.executable, "-m", "tests.pms.supervisor_harness"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        seen = b""
        deadline = time.monotonic() + 60
        while b"Admin login:" not in seen and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stderr], [], [], 0.5)[0]:  # never block past the deadline
                seen += proc.stderr.read1(65536)  # type: ignore[attr-defined]
        assert b"Admin login:" in seen, seen.decode(errors="replace")
        tree = psutil.Process(proc.pid).children(recursive=True)
        proc.stderr.close()  # the terminal is gone
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=60) == EXIT_OK
        assert _alive(tree) == []
        assert not state_path(settings).exists()  # a clean stop removes its state
    finally:
        if proc.poll() is None:
            proc.kill()


def test_service_that_never_gets_ready_fails_the_start(
    servers: ServerSet, tmp_path: Path, run_supervisor: Any
) -> None:
    settings = external_settings(servers, tmp_path / "data", supervisor={"ready_timeout_s": 1.5})
    services = [{"name": "auth", "mode": "never-ready", "section": "auth"}]
    run = run_supervisor(settings, {"services": services})
    assert run.wait(timeout=30) == EXIT_FAILED
    out = run.output()
    assert "auth did not become ready within 2s" in out
    assert f"http://127.0.0.1:{settings.auth.port}/ready" in out
    assert "fake http service listening" in out  # its log tail
    assert not process.port_in_use("127.0.0.1", settings.auth.port)


def test_child_that_ignores_sigterm_is_killed_on_stop(
    servers: ServerSet, tmp_path: Path, run_supervisor: Any
) -> None:
    settings = external_settings(servers, tmp_path / "data", supervisor={"stop_timeout_s": 1.0})
    services = [{"name": "auth", "mode": "stubborn", "section": "auth"}]
    run = run_supervisor(settings, {"services": services})
    run.wait_ready()
    tree = run.descendants()
    assert run.stop(signal.SIGINT) == EXIT_OK, run.output()
    assert "auth ignored SIGTERM for 1s and was killed (was killed by SIGKILL)" in run.output()
    assert _alive(tree) == []


def test_second_ctrl_c_kills_what_is_still_stopping(
    servers: ServerSet, tmp_path: Path, run_supervisor: Any
) -> None:
    """With a minute of grace for a child that ignores SIGTERM, the second Ctrl-C must not wait for it."""
    settings = external_settings(servers, tmp_path / "data", supervisor={"stop_timeout_s": 60.0})
    services = [STACK[1], {"name": "patient", "mode": "stubborn", "section": "patient"}]
    run = run_supervisor(settings, {"services": services})
    run.wait_ready()
    tree = run.descendants()
    run.proc.send_signal(signal.SIGINT)
    process.wait_until(lambda: "Ctrl-C again" in run.output(), timeout=30, message="the stop to begin",
                       alive=run.alive)
    began = time.monotonic()
    assert run.stop(signal.SIGINT, timeout=30) == EXIT_OK, run.output()
    assert time.monotonic() - began < 30  # not the 60 s stop timeout
    out = run.output()
    assert "second Ctrl-C: killed everything that was still stopping" in out
    assert "ignored SIGTERM" not in out
    process.wait_until(lambda: not _alive(tree), timeout=10, message="every child to be gone")
    assert not process.port_in_use("127.0.0.1", settings.patient.port)


def test_dependents_of_a_dead_child_are_named_and_keep_running(
    servers: ServerSet, tmp_path: Path, run_supervisor: Any
) -> None:
    settings = external_settings(servers, tmp_path / "data", supervisor=FAST_SETTINGS)
    run = run_supervisor(settings, {"services": STACK})
    run.wait_ready()
    before = {name: run.service(name)["pid"] for name in ("auth", "patient", "gateway")}
    billing = run.service("billing")["pid"]
    os.kill(billing, signal.SIGKILL)
    process.wait_until(
        lambda: run.service("billing").get("restarts") == 1 and run.service("billing").get("state") == "ready",
        timeout=30, message="billing restarted", alive=run.alive,
    )
    out = run.output()
    assert f"billing (pid {billing}) was killed by SIGKILL" in out
    # patient needs billing, the gateway needs patient: both named, auth is not.
    assert "affected while billing is down: patient, gateway (they depend on it" in out
    assert {name: run.service(name)["pid"] for name in before} == before
    assert all(run.service(name)["restarts"] == 0 for name in before)
    assert _status(settings)[0] == EXIT_OK
    assert run.stop(signal.SIGTERM) == EXIT_OK, run.output()


def test_logs_are_rotated_while_a_service_writes_them(
    servers: ServerSet, tmp_path: Path, run_supervisor: Any
) -> None:
    settings = external_settings(servers, tmp_path / "data",
                                 supervisor={"log_max_bytes": 20_000, "log_backups": 2})
    run = run_supervisor(settings, {"services": [{"name": "auth", "mode": "chatty", "section": "auth"}]})
    run.wait_ready()
    log = settings.logs_dir / "auth.log"
    oldest = settings.logs_dir / "auth.log.2"

    def rotated_three_times() -> bool:
        # the first generation (starting with the listening line) has been pushed out of .2
        try:
            return not oldest.read_text().startswith("fake http service listening")
        except FileNotFoundError:
            return False

    process.wait_until(rotated_three_times, timeout=60, message="three rotations", alive=run.alive)
    # Stopping right after a rotation would leave the current file empty (seen once in a clean-clone run).
    process.wait_until(lambda: "chatty" in log.read_text(), timeout=30, message="output in the current log",
                       alive=run.alive)
    assert run.stop(signal.SIGINT) == EXIT_OK, run.output()

    assert sorted(p.name for p in settings.logs_dir.iterdir()) == ["auth.log", "auth.log.1", "auth.log.2"]
    numbers = []
    for path in (oldest, settings.logs_dir / "auth.log.1", log):
        data = path.read_bytes()
        assert b"\0" not in data, f"{path.name} has a hole: the writer did not append after the truncate"
        numbers.append([int(line.split()[2]) for line in data.decode().splitlines() if line.startswith("chatty")])
    # The current file may have been rotated once more between that wait and the stop: empty, then.
    assert all(numbers[:2]), numbers
    for older, newer in itertools.pairwise([n for n in numbers if n]):
        # Each file continues where the one before it ends. Copy-truncate can lose what is written between
        # its last read and the truncate: microseconds, unless the supervisor is descheduled right there
        # (this machine is loaded), hence a bound of 0.1 s of output rather than "one line".
        assert 0 < newer[0] - older[-1] <= 50, (older[-1], newer[0])
    kept = sum(p.stat().st_size for p in settings.logs_dir.iterdir())
    written = ([n for n in numbers if n][-1][-1] + 1) * 100
    assert kept < written  # the oldest output is gone: the logs stay bounded


def test_restart_policy_and_timeouts_come_from_settings(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path / "data").model_copy(update={"supervisor": SupervisorSettings(
        max_restarts=7, restart_window_s=30, backoff_initial_s=0.25, backoff_max_s=4, stop_timeout_s=3,
        ready_timeout_s=45)})
    supervisor = Supervisor(settings, services=fake_specs(STACK))
    assert supervisor.policy == RestartPolicy(max_restarts=7, window_s=30, backoff_initial_s=0.25, backoff_max_s=4)
    assert (supervisor.stop_timeout_s, supervisor.ready_timeout_s) == (3, 45)
    assert Supervisor(settings, stop_timeout_s=1.5).stop_timeout_s == 1.5  # an explicit argument still wins


@pytest.mark.parametrize("variable", ["PMS_SUPERVISOR__MAX_RESTARTS=-1", "PMS_SUPERVISOR__STOP_TIMEOUT_S=0",
                                      "PMS_SUPERVISOR__LOG_MAX_BYTES=0"])
def test_nonsense_supervisor_settings_are_refused(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    name, _, value = variable.partition("=")
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.rpartition("__")[2].lower()):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_killed_supervisor_takes_its_children_with_it(
    servers: ServerSet, tmp_path: Path, run_supervisor: Any
) -> None:
    """kill -9 of the supervisor cannot run its cleanup: the parent-death signal stops the children."""
    settings = external_settings(servers, tmp_path / "data")
    run = run_supervisor(settings, {"services": STACK})
    run.wait_ready()
    tree = run.descendants()
    assert len(tree) >= len(STACK)
    run.proc.kill()
    run.wait(timeout=30)
    process.wait_until(lambda: not _alive(tree), timeout=30, message="orphans to die")
    assert state_path(settings).exists()  # left behind, but stale ...
    assert _status(settings)[0] == EXIT_NOT_RUNNING  # ... so status does not believe it


# -- in-process: paths that end before anything starts ----------------------------------------------


def _in_process(settings: Settings, **kwargs: Any) -> tuple[int, str]:
    buffer = io.StringIO()
    supervisor = Supervisor(settings, services=fake_specs(STACK),
                            console=Console(file=buffer, width=300, color_system=None), **kwargs)
    return supervisor.run(), buffer.getvalue()


@pytest.mark.parametrize("section", ["patient", "postgres"])
def test_port_in_use_is_one_clear_line(tmp_path: Path, section: str) -> None:
    settings = embedded_settings(tmp_path / "data")
    port = getattr(settings, section).port
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        code, out = _in_process(settings)
    assert code == EXIT_FAILED
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert f"port {port} on 127.0.0.1 is already in use" in lines[0]
    assert f"PMS_{section.upper()}__PORT" in lines[0]
    assert not (settings.data_dir / "postgres").exists(), "started PostgreSQL despite the conflict"


@pytest.mark.parametrize("host", ["192.0.2.77", "no-such-host.invalid"])  # not this machine's; not a name
def test_a_host_nothing_can_listen_on_is_not_called_a_taken_port(tmp_path: Path, host: str) -> None:
    settings = embedded_settings(tmp_path / "data")
    settings.patient.host = host
    code, out = _in_process(settings)
    assert code == EXIT_FAILED
    assert f"patient cannot listen on {host}:{settings.patient.port}" in out and "check PMS_PATIENT__HOST" in out
    assert "already in use" not in out
    assert not (settings.data_dir / "postgres").exists()


def test_a_server_whose_restart_fails_is_tried_again(data_dir: Path) -> None:
    """PostgreSQL dies, its first restart fails (here: a bad setting), the next one, after the backoff, works."""
    from pms.embedded import EmbeddedPostgres

    settings = embedded_settings(data_dir)
    buffer = io.StringIO()
    policy = RestartPolicy(max_restarts=5, window_s=60, backoff_initial_s=0.5, backoff_max_s=1.0)
    supervisor = Supervisor(settings, services=[], policy=policy,
                            console=Console(file=buffer, width=300, color_system=None))
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(supervisor.run()), daemon=True)
    runner.start()
    try:
        process.wait_until(lambda: supervisor.postgres is not None and supervisor.postgres.proc is not None
                           and "Admin login" in buffer.getvalue(), timeout=60, message="pms up")
        postgres = supervisor.postgres
        assert isinstance(postgres, EmbeddedPostgres)
        conf = postgres.pgdata / "postgresql.auto.conf"
        good = conf.read_text()
        conf.write_text(good + "no_such_setting_for_this_test = 1\n")
        os.kill(postgres.proc.pid, signal.SIGKILL)
        process.wait_until(lambda: "retrying postgres" in buffer.getvalue(), timeout=30,
                           message="a failed restart", alive=runner.is_alive)
        conf.write_text(good)
        process.wait_until(postgres.is_ready, timeout=30, message="PostgreSQL back", alive=runner.is_alive)
        assert runner.is_alive() and not result
        assert "postgres did not start" in buffer.getvalue()
    finally:
        supervisor.request_stop()
        runner.join(60)
    assert result == [EXIT_OK], buffer.getvalue()


def test_a_server_that_will_not_start_shows_this_run_s_log_only(data_dir: Path) -> None:
    """postgres.log is appended across runs; the tail after a failed start must not show older runs' lines."""
    from pms.embedded import EmbeddedPostgres

    settings = embedded_settings(data_dir)
    postgres = EmbeddedPostgres(settings)
    postgres.initialise()
    with open(postgres.pgdata / "postgresql.auto.conf", "a") as conf:
        conf.write("no_such_setting_for_this_test = 1\n")
    postgres.log_path.parent.mkdir(parents=True, exist_ok=True)
    postgres.log_path.write_text("a line from an earlier run\n")
    code, out = _in_process(settings)
    assert code == EXIT_FAILED
    assert "postgres did not start" in out and "no_such_setting_for_this_test" in out
    assert "a line from an earlier run" not in out


def test_broker_port_in_use_names_its_setting(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path / "data")
    port = int(settings.kafka.bootstrap_servers.rpartition(":")[2])
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        code, out = _in_process(settings)
    assert code == EXIT_FAILED
    assert f"port {port} on 127.0.0.1 is already in use (broker needs it); set PMS_KAFKA__BOOTSTRAP_SERVERS" in out


def test_two_services_on_one_port_is_refused(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path / "data")
    settings.auth.port = settings.patient.port
    code, out = _in_process(settings)
    assert code == EXIT_FAILED
    assert f"port {settings.patient.port} is configured for both" in out


def test_unknown_only_name_is_a_usage_error(tmp_path: Path) -> None:
    code, out = _in_process(embedded_settings(tmp_path / "data"), only=["nope"])
    assert code == EXIT_USAGE
    assert "unknown service 'nope'" in out


def test_select_services_adds_dependencies_in_start_order() -> None:
    specs = fake_specs(STACK)
    assert [s.name for s in select_services(specs, ["gateway"])] == ["billing", "auth", "patient", "gateway"]
    assert [s.name for s in select_services(specs, ["auth"])] == ["auth"]
    assert [s.name for s in select_services(specs, None)] == ["billing", "auth", "patient", "gateway"]
    cyclic = [ServiceSpec("a", "", Kind.CALLABLE, "x:y", "auth", depends_on=("b",)),
              ServiceSpec("b", "", Kind.CALLABLE, "x:y", "patient", Probe.HTTP, depends_on=("a",))]
    with pytest.raises(ValueError, match="cycle"):
        select_services(cyclic, ["a"])


def test_restart_backoff_doubles_up_to_the_cap() -> None:
    policy = RestartPolicy(backoff_initial_s=0.5, backoff_max_s=3.0)
    assert [policy.backoff(n) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


# -- pms status ----------------------------------------------------------------------------------


def test_status_when_nothing_runs(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path / "data")
    assert _status(settings) == (EXIT_NOT_RUNNING, _status(settings)[1])
    assert "not running" in _status(settings)[1]
    # A state file left by a dead supervisor does not count as running.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state_path(settings).parent.mkdir(parents=True, exist_ok=True)
    state_path(settings).write_text(json.dumps({"pid": dead.pid, "started_at": "x", "mode": "embedded"}))
    assert read_state(settings) is None
    assert _status(settings)[0] == EXIT_NOT_RUNNING


def test_status_reports_a_service_that_is_down(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path / "data")
    me = psutil.Process()
    port = process.free_port()
    state = {"pid": me.pid, "create_time": me.create_time(), "started_at": "now", "mode": "embedded",
             "servers": {},
             "services": [{"name": "patient", "pid": None, "state": "restarting", "host": "127.0.0.1",
                           "port": port, "probe": "http", "probe_path": "/ready",
                           "url": f"http://127.0.0.1:{port}", "restarts": 2}]}
    state_path(settings).parent.mkdir(parents=True, exist_ok=True)
    state_path(settings).write_text(json.dumps(state))
    code, out = _status(settings)
    assert code == EXIT_FAILED
    assert "patient" in out and "down" in out


def test_pms_status_command_exit_code(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PMS_")}
    env["PMS_DATA_DIR"] = str(tmp_path / "data")
    result = subprocess.run([sys.executable, "-m", "pms.cli", "status"], env=env, capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == EXIT_NOT_RUNNING, result.stderr
    assert "not running" in result.stdout


def test_pms_up_with_a_mistyped_or_renamed_setting_refuses_to_start(tmp_path: Path) -> None:
    """A nested variable that names no setting would otherwise be silently ignored (its default stays)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PMS_")}
    env.update(PMS_DATA_DIR=str(tmp_path / "data"), PMS_PATIENT__OUTBOX_POLL_INTERVAL="0.5",
               PMS_GATEWAY__REVOCATION_REFRESH_S="2", COLUMNS="200")
    result = subprocess.run([sys.executable, "-m", "pms.cli", "up"], env=env, capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == EXIT_USAGE
    assert ("PMS_PATIENT__OUTBOX_POLL_INTERVAL is not a setting (did you mean PMS_PATIENT__OUTBOX_POLL_INTERVAL_S?)"
            in result.stderr)
    assert "PMS_GATEWAY__REVOCATION_REFRESH_S was renamed PMS_JWT__REVOCATION_REFRESH_S" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_pms_up_with_invalid_settings_says_why_without_a_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PMS_")}
    env.update(PMS_DATA_DIR=str(tmp_path / "data"), PMS_DATABASE_URL="postgresql://pms@db.example/postgres",
               COLUMNS="200")
    result = subprocess.run([sys.executable, "-m", "pms.cli", "up"], env=env, capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == EXIT_USAGE
    assert "PMS_JWT__SECRET is required" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()
