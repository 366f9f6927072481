"""The supervisor behind ``pms up`` and ``pms status``.

``pms up`` starts the embedded PostgreSQL and Tansu broker (unless external servers are
configured), then every registered service as a ``pms serve NAME`` child in dependency
order, each as soon as everything it depends on answers its readiness probe. It shows a
live status table while starting, prints where everything is and the admin login, and then
watches the children until Ctrl-C / SIGTERM, when it stops them in reverse order.

Restart policy (documented in the README, knobs in ``settings.supervisor``): a child that
exits on its own -- while starting or after it was ready -- is named, the tail of its log is
printed, and it is restarted after an exponential backoff (``backoff_initial_s`` doubling up
to ``backoff_max_s``). When one child has already been restarted ``max_restarts`` times within
``restart_window_s`` seconds, the supervisor gives up: it stops everything and exits with
:data:`EXIT_FAILED`. A child that does not become ready within ``ready_timeout_s`` is a start
failure (stop everything, exit non-zero): waiting longer would only hide the problem.

Dependents of a child that died are named but NOT restarted: ``depends_on`` orders the start,
and every such edge is a network client that reconnects by itself (the gRPC channel to
billing, the gateway's HTTP upstreams), answering 502/503/``billingStatus PENDING`` meanwhile.
Restarting them would only drop their in-flight work and lengthen the outage.

Stopping: Ctrl-C / SIGTERM / SIGHUP stops children in reverse order, each with SIGTERM and
``stop_timeout_s`` before SIGKILL; a second Ctrl-C (or any second stop signal) while that
runs SIGKILLs everything still running at once.

Logs: each child's stdout/stderr is appended to ``<data_dir>/logs/<name>.log``; the
supervisor copy-truncates a log that outgrows ``log_max_bytes`` and keeps ``log_backups``
copies (:func:`pms.process.rotate_log`), so the children need not cooperate.

``pms status`` reads the state file the supervisor keeps in the data dir (pids, ports,
start time) and probes each service itself.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from subprocess import Popen
from typing import TYPE_CHECKING, Any, TextIO

import psutil
from pydantic import SecretStr
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import URL

from pms import process
from pms.probe import probe
from pms.registry import SERVICES, Probe, ServiceSpec, serve_command, start_order
from pms.settings import Mode, Settings, SupervisorSettings, child_env, read_or_create_secret

#: Exit codes of ``pms up`` and ``pms status``.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3

STATE_FILE = "supervisor.json"
ADMIN_PASSWORD_FILE = "admin.password"
#: Marker in the data dir: the generated admin password has been printed once.
ADMIN_SHOWN_MARKER = ".admin-password-shown"
LOG_TAIL_LINES = 20
#: How often the supervisor checks the size of the logs it rotates, seconds.
LOG_CHECK_INTERVAL_S = 1.0

if TYPE_CHECKING:
    from pms.embedded import EmbeddedBroker, EmbeddedPostgres

CommandFactory = Callable[[ServiceSpec], list[str]]
_DEFAULTS = SupervisorSettings()


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When to restart a child that died, and when to give up on it."""

    #: Restarts of one child allowed inside ``window_s``; the next death stops everything.
    #: Defaults are the settings' (``PMS_SUPERVISOR__*``), so there is one place for them.
    max_restarts: int = _DEFAULTS.max_restarts
    window_s: float = _DEFAULTS.restart_window_s
    backoff_initial_s: float = _DEFAULTS.backoff_initial_s
    backoff_max_s: float = _DEFAULTS.backoff_max_s

    @classmethod
    def from_settings(cls, settings: SupervisorSettings) -> RestartPolicy:
        return cls(max_restarts=settings.max_restarts, window_s=settings.restart_window_s,
                   backoff_initial_s=settings.backoff_initial_s, backoff_max_s=settings.backoff_max_s)

    def backoff(self, recent_restarts: int) -> float:
        """Delay before the next restart: doubles with every recent restart, capped."""
        return min(self.backoff_max_s, self.backoff_initial_s * (2**recent_restarts))


class State(StrEnum):
    WAITING = "waiting"
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "restarting"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass
class Child:
    """One supervised service and what the supervisor knows about it."""

    spec: ServiceSpec
    log_path: Path
    state: State = State.WAITING
    proc: Popen[bytes] | None = None
    spawned_at: float = 0.0
    ready_after_s: float | None = None
    restart_at: float = 0.0
    restarts: deque[float] = field(default_factory=deque)
    total_restarts: int = 0
    last_exit: int | None = None
    #: Size of the log when the current process started: its tail shows only this run.
    log_offset: int = 0


class _StartFailed(Exception):
    """An embedded server did not start (the reason was already printed)."""


class _GiveUp(Exception):
    """Stop everything and exit with ``code`` (the reason has been printed)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


# -- probes ----------------------------------------------------------------------------


def _address(host: str, port: int) -> str:
    return f"{host}:{port}"


def service_url(spec: ServiceSpec, settings: Settings) -> str:
    """Where a service answers: ``http://host:port`` or, for gRPC, ``host:port``."""
    address = _address(spec.host(settings), spec.port(settings))
    return address if spec.probe is Probe.GRPC else f"http://{address}"


def select_services(services: Sequence[ServiceSpec], only: Iterable[str] | None) -> list[ServiceSpec]:
    """The services to start, in start order: ``only`` and everything they depend on.

    Raises:
        ValueError: a name in ``only`` is unknown, or the dependencies form a cycle.
    """
    by_name = {spec.name: spec for spec in services}
    if not only:
        return start_order(tuple(services))
    wanted: set[str] = set()
    pending = list(only)
    while pending:
        name = pending.pop()
        if name not in by_name:
            raise ValueError(f"unknown service {name!r}; known services: {', '.join(by_name)}")
        if name not in wanted:
            wanted.add(name)
            pending.extend(dep for dep in by_name[name].depends_on if dep in by_name)
    return start_order(tuple(spec for spec in services if spec.name in wanted))


def describe_exit(code: int | None) -> str:
    """``exited with code 3`` or ``was killed by SIGKILL`` (Popen reports signals as -N)."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exited with code {code}"


def log_size(path: Path) -> int:
    """Where this run's lines of an appended log start: its size now (0 before its first line)."""
    return path.stat().st_size if path.exists() else 0


def tail(path: Path, lines: int = LOG_TAIL_LINES, *, since: int = 0) -> str:
    """The last ``lines`` lines of a log file written after byte ``since`` (reads only the end)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            if since > size:  # rotated (copy-truncated) since: this run's output starts at the top
                since = 0
            handle.seek(max(since, size - 64 * 1024))
            data = handle.read().decode(errors="replace")
    except FileNotFoundError:
        return "(no log yet)"
    return "\n".join(data.splitlines()[-lines:]) or "(log is empty)"


# -- state file --------------------------------------------------------------------------


def state_path(settings: Settings) -> Path:
    return settings.data_dir / STATE_FILE


def read_state(settings: Settings) -> dict[str, Any] | None:
    """The running supervisor's state, or None when none runs (stale files count as none)."""
    try:
        state = json.loads(state_path(settings).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state if _pid_alive(state.get("pid"), state.get("create_time")) else None


def _pid_alive(pid: object, create_time: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        proc = psutil.Process(pid)
        # A recycled pid belongs to another process started at another time.
        if isinstance(create_time, (int, float)) and abs(proc.create_time() - create_time) > 1.0:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


# -- the supervisor ------------------------------------------------------------------------


class HangupSafeStream(io.TextIOBase):
    """A console stream whose writes cannot fail: after the terminal is gone they are dropped.

    Closing the terminal sends SIGHUP and then makes every write to it fail (EIO; EPIPE for a
    closed pipe). The supervisor prints "stopping everything" before it stops the children, so a
    failing print cut the shutdown short: children died by the parent-death SIGKILL, PostgreSQL
    had to recover at the next start and the state files stayed behind.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self._stream.write(text)
            except OSError:
                self.broken = True
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except OSError:
                self.broken = True

    def isatty(self) -> bool:
        try:
            return not self.broken and self._stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")


def hangup_safe_console(stream: TextIO | None = None, **options: Any) -> Console:
    """The supervisor's console: rich on stderr (or ``stream``), through a :class:`HangupSafeStream`."""
    return Console(file=HangupSafeStream(stream or sys.stderr), **options)


class Supervisor:
    """Runs the embedded servers and the services until told to stop.

    Args:
        settings: the configuration every child receives (as ``PMS_*`` variables).
        only: start only these services and what they depend on.
        services: the service list (default: the registry); tests pass stand-ins.
        command: argv for a service (default ``python -m pms.cli serve NAME``).
        policy: restart policy for children that die (default: from ``settings.supervisor``).
        ready_timeout_s: how long one service may take to answer its probe (default: the setting).
        stop_timeout_s: how long one service may take to exit after SIGTERM before SIGKILL (default: the setting).
        console: where status and messages go (default: stderr).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        only: Iterable[str] | None = None,
        services: Sequence[ServiceSpec] | None = None,
        command: CommandFactory = serve_command,
        policy: RestartPolicy | None = None,
        ready_timeout_s: float | None = None,
        poll_interval_s: float = 0.1,
        stop_timeout_s: float | None = None,
        console: Console | None = None,
    ) -> None:
        self.settings = settings
        self.only = list(only or [])
        self.services = tuple(SERVICES if services is None else services)
        self.command = command
        self.policy = policy or RestartPolicy.from_settings(settings.supervisor)
        self.ready_timeout_s = settings.supervisor.ready_timeout_s if ready_timeout_s is None else ready_timeout_s
        self.poll_interval_s = poll_interval_s
        self.stop_timeout_s = settings.supervisor.stop_timeout_s if stop_timeout_s is None else stop_timeout_s
        self.console = console or hangup_safe_console()
        self.children: list[Child] = []
        #: Size of each embedded server's log when it was last started (see ``_start_server``).
        self._server_log_offsets: dict[str, int] = {}
        self.postgres: EmbeddedPostgres | None = None
        self.broker: EmbeddedBroker | None = None
        self._infra_restarts: dict[str, deque[float]] = {"postgres": deque(), "broker": deque()}
        #: When a dead embedded server is next tried (absent: it runs, or was never started).
        self._server_retry_at: dict[str, float] = {}
        self._stop = threading.Event()
        #: Set by a second stop signal: everything still running is SIGKILLed, nothing waits any more.
        self._force = threading.Event()
        self._force_announced = False
        self._next_log_check = 0.0
        self._started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self._env: dict[str, str] = {}

    # -- public ------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask :meth:`run` to stop everything and return (what SIGINT, SIGTERM and SIGHUP do)."""
        self._stop.set()

    def run(self) -> int:
        """Start everything, supervise until stopped; return the process exit code."""
        previous = self._install_signal_handlers()
        try:
            return self._run()
        finally:
            self._shutdown()
            self._restore_signal_handlers(previous)

    # -- phases ------------------------------------------------------------------------
    def _run(self) -> int:
        try:
            selected = select_services(self.services, self.only)
        except ValueError as exc:
            self._error(str(exc))
            return EXIT_USAGE
        running = read_state(self.settings)
        if running is not None:
            self._error(
                f"pms is already running from {self.settings.data_dir} (pid {running['pid']}); "
                "`pms status` shows it"
            )
            return EXIT_FAILED
        conflict = self._port_conflict(selected)
        if conflict:
            self._error(conflict)
            return EXIT_FAILED
        self.children = [Child(spec, self.settings.logs_dir / f"{spec.name}.log") for spec in selected]
        try:
            self._start_infra()
            if self._stop.is_set():
                return EXIT_OK
            self._env = self._child_env()
            self._write_state()
            if not self._start_services():
                return EXIT_OK  # stopped by a signal while starting
            self._print_summary()
            self._monitor()
        except _GiveUp as give_up:
            return give_up.code
        return EXIT_OK

    def _port_conflict(self, selected: Sequence[ServiceSpec]) -> str | None:
        """One line naming a taken port and the setting that moves it, or None."""
        wanted: list[tuple[str, int, str, str]] = []
        if self.settings.mode is Mode.EMBEDDED:
            wanted.append((self.settings.postgres.host, self.settings.postgres.port, "postgres",
                           "PMS_POSTGRES__PORT"))
        if self.settings.kafka_bootstrap_servers is None:
            host, _, port = self.settings.kafka.bootstrap_servers.rpartition(":")
            wanted.append((host or "127.0.0.1", int(port), "broker", "PMS_KAFKA__BOOTSTRAP_SERVERS"))
        wanted += [(spec.host(self.settings), spec.port(self.settings), spec.name, spec.port_setting)
                   for spec in selected]
        seen: dict[int, str] = {}
        for host, port, name, setting in wanted:
            if port in seen:
                return f"port {port} is configured for both {seen[port]} and {name}; set {setting} to another port"
            seen[port] = name
            problem = process.listen_problem(host, port)
            if problem == process.IN_USE:
                return (f"port {port} on {host} is already in use ({name} needs it); "
                        f"set {setting} to use another port")
            if problem:
                host_setting = setting.removesuffix("__PORT") + "__HOST" if setting.endswith("__PORT") else setting
                return f"{name} cannot listen on {host}:{port} ({problem}); check {host_setting}"
        return None

    def _start_infra(self) -> None:
        from pms.embedded import EmbeddedBroker, EmbeddedPostgres

        if self.settings.mode is Mode.EMBEDDED:
            self.postgres = EmbeddedPostgres(self.settings)
            self._start_server("postgres", self.postgres)
        if self.settings.kafka_bootstrap_servers is None:
            self.broker = EmbeddedBroker(self.settings)
            self._start_server("broker", self.broker)

    def _start_server(self, name: str, server: EmbeddedPostgres | EmbeddedBroker) -> None:
        """Start an embedded server; a failure ends ``pms up`` (:class:`_GiveUp`) at the first start."""
        try:
            self._try_start_server(name, server)
        except _StartFailed as exc:
            raise _GiveUp(EXIT_FAILED) from exc

    def _try_start_server(self, name: str, server: EmbeddedPostgres | EmbeddedBroker) -> None:
        from pms.embedded import PortInUseError

        # The log is appended across runs: a tail shown later starts at this run's first line.
        self._server_log_offsets[name] = log_size(server.log_path)
        with self.console.status(f"starting {name} ..."):
            try:
                proc = server.start()
            except PortInUseError as exc:
                self._error(str(exc))
                raise _StartFailed(name) from exc
            except (RuntimeError, TimeoutError, OSError) as exc:
                self._error(f"{name} did not start: {exc}")
                self._show_tail(name, server.log_path, since=self._server_log_offsets[name])
                raise _StartFailed(name) from exc
        self.console.print(f"[green]ready[/] {name} (pid {proc.pid})")

    def _child_env(self) -> dict[str, str]:
        """The environment of every service: ours without PMS_*, plus the settings as PMS_*."""
        settings = self.settings
        password = self._admin_password()
        if password is not None and settings.admin_password is None:
            # Hand the generated password to the auth service so the two agree.
            settings = settings.model_copy(update={"admin_password": SecretStr(password)})
        return child_env(settings)

    def _admin_password(self) -> str | None:
        """The first admin's password: configured, or generated once into the secrets dir (embedded)."""
        if self.settings.admin_password is not None:
            return self.settings.admin_password.get_secret_value()
        if self.settings.mode is Mode.EMBEDDED:
            return read_or_create_secret(self.settings.secrets_dir / ADMIN_PASSWORD_FILE, nbytes=18)
        return None

    def _start_services(self) -> bool:
        """Start every child once its dependencies are ready; False when stopped meanwhile."""
        try:
            with Live(self._table(), console=self.console, auto_refresh=False, transient=False) as live:
                try:
                    while not self._stop.is_set():
                        now = time.monotonic()
                        for child in self.children:
                            self._step(child, now)
                        self._write_state()
                        live.update(self._table(), refresh=True)
                        if all(child.state is State.READY for child in self.children):
                            return True
                        self._stop.wait(self.poll_interval_s)
                finally:
                    live.update(self._table(), refresh=True)
        finally:
            if not self.console.is_terminal:
                self.console.line()  # a non-terminal Live leaves its last line open
        return False

    def _monitor(self) -> None:
        """Watch children (and the embedded servers) until a stop is requested."""
        while not self._stop.wait(self.poll_interval_s):
            now = time.monotonic()
            changed = False
            for child in self.children:
                before = (child.state, child.proc)
                self._step(child, now)
                changed |= before != (child.state, child.proc)
            changed |= self._check_server("postgres", self.postgres)
            changed |= self._check_server("broker", self.broker)
            if changed:
                self._write_state()
            if now >= self._next_log_check:
                self._next_log_check = now + LOG_CHECK_INTERVAL_S
                self._rotate_logs()

    # -- one child -----------------------------------------------------------------------
    def _step(self, child: Child, now: float) -> None:
        due = child.state is State.BACKOFF and now >= child.restart_at
        if due or (child.state is State.WAITING and self._dependencies_ready(child)):
            self._spawn(child, now)
        elif child.state in (State.STARTING, State.READY):
            assert child.proc is not None
            code = child.proc.poll()
            if code is not None:
                self._child_died(child, code, now)
            elif child.state is State.STARTING:
                spec = child.spec
                if probe(spec.probe, spec.host(self.settings), spec.port(self.settings), spec.probe_path):
                    child.state = State.READY
                    child.ready_after_s = now - child.spawned_at
                    if child.total_restarts:
                        self.console.print(f"[green]ready[/] {spec.name} again after restart")
                elif now - child.spawned_at > self.ready_timeout_s:
                    target = service_url(spec, self.settings)
                    if spec.probe is Probe.HTTP:
                        target += spec.probe_path
                    self._error(f"{spec.name} did not become ready within {self.ready_timeout_s:.0f}s "
                                f"(probe {target})")
                    self._show_tail(spec.name, child.log_path, since=child.log_offset)
                    child.state = State.FAILED
                    raise _GiveUp(EXIT_FAILED)

    def _dependencies_ready(self, child: Child) -> bool:
        states = {c.spec.name: c.state for c in self.children}
        return all(states.get(dep, State.READY) is State.READY for dep in child.spec.depends_on)

    def _spawn(self, child: Child, now: float) -> None:
        self._rotate(child.log_path)  # logs are appended across runs: start below the limit
        child.log_offset = log_size(child.log_path)
        child.proc = process.spawn(self.command(child.spec), log_path=child.log_path, env=self._env)
        child.state = State.STARTING
        child.spawned_at = now

    def _child_died(self, child: Child, code: int, now: float) -> None:
        name = child.spec.name
        pid = child.proc.pid if child.proc else None
        child.last_exit = code
        child.proc = None
        self._error(f"{name} (pid {pid}) {describe_exit(code)}")
        self._show_tail(name, child.log_path, since=child.log_offset)
        affected = self._dependents(name)
        if affected:
            self.console.print(f"affected while {name} is down: {', '.join(affected)} "
                               f"(they depend on it, keep running and reconnect when it is back; not restarted)",
                               highlight=False)
        try:
            delay = self._admit_restart(child.restarts, now, f"{name} died")
        except _GiveUp:
            child.state = State.FAILED
            raise
        child.total_restarts += 1
        child.state = State.BACKOFF
        child.restart_at = now + delay
        self.console.print(f"[yellow]restarting[/] {name} in {delay:.1f}s "
                           f"(restart {len(child.restarts)} of at most {self.policy.max_restarts} "
                           f"per {self.policy.window_s:.0f}s)")

    def _admit_restart(self, restarts: deque[float], now: float, what: str) -> float:
        """Count one more failure against the restart policy; the backoff before the next try.

        Children and embedded servers share it. Raises :class:`_GiveUp` (the reason printed) once
        ``max_restarts`` restarts within ``window_s`` are used up.
        """
        recent = self._recent(restarts, now)
        if len(recent) >= self.policy.max_restarts:
            self._error(f"{what} {len(recent) + 1} times within {self.policy.window_s:.0f}s: "
                        "giving up, stopping everything")
            raise _GiveUp(EXIT_FAILED)
        delay = self.policy.backoff(len(recent))
        recent.append(now)
        return delay

    def _dependents(self, name: str) -> list[str]:
        """Children that depend on ``name``, directly or through another child, in start order."""
        affected: set[str] = set()
        grew = True
        while grew:
            grew = False
            for child in self.children:
                spec = child.spec
                if spec.name not in affected and any(dep == name or dep in affected for dep in spec.depends_on):
                    affected.add(spec.name)
                    grew = True
        return [child.spec.name for child in self.children if child.spec.name in affected]

    # -- logs ----------------------------------------------------------------------------
    def _rotate(self, path: Path) -> bool:
        supervisor = self.settings.supervisor
        try:
            return process.rotate_log(path, max_bytes=supervisor.log_max_bytes, backups=supervisor.log_backups)
        except OSError as exc:  # a full disk must not take the supervisor down with it
            self._error(f"could not rotate {path}: {exc}")
            return False

    def _rotate_logs(self) -> None:
        """Copy-truncate every child's and server's log that outgrew ``log_max_bytes``."""
        for child in self.children:
            if self._rotate(child.log_path):
                child.log_offset = 0  # this run's output now starts at the top of the file
        for server in (self.postgres, self.broker):
            if server is not None:
                self._rotate(server.log_path)

    def _recent(self, restarts: deque[float], now: float) -> deque[float]:
        while restarts and now - restarts[0] > self.policy.window_s:
            restarts.popleft()
        return restarts

    def _check_server(self, name: str, server: EmbeddedPostgres | EmbeddedBroker | None) -> bool:
        """Restart an embedded server that died (same policy as services); True if anything happened.

        A restart that fails counts like another death: it is tried again after the policy's
        backoff, and only more failures than ``max_restarts`` inside the window end everything
        (a first restart failing, e.g. while a dead server's backend still held its memory,
        used to stop the whole platform at once).
        """
        if server is None:
            return False
        now = time.monotonic()
        if server.proc is not None:
            code = server.proc.poll()
            if code is None:
                return False
            pid = server.proc.pid
            server.proc = None
            self._error(f"{name} (pid {pid}) {describe_exit(code)}")
            self._show_tail(name, server.log_path, since=self._server_log_offsets.get(name, 0))
            self._admit_restart(self._infra_restarts[name], now, f"{name} died")
            self._server_retry_at[name] = now  # at once: services are waiting for it
        retry_at = self._server_retry_at.get(name)
        if retry_at is None or now < retry_at:
            return False
        self.console.print(f"[yellow]restarting[/] {name}")
        try:
            self._try_start_server(name, server)
        except _StartFailed:
            failed_at = time.monotonic()
            delay = self._admit_restart(self._infra_restarts[name], failed_at, f"{name} failed to restart")
            self._server_retry_at[name] = failed_at + delay
            self.console.print(f"[yellow]retrying[/] {name} in {delay:.1f}s")
            return True
        del self._server_retry_at[name]
        return True

    # -- stop ----------------------------------------------------------------------------
    def _shutdown(self) -> None:
        """Stop services in reverse start order, then the broker, then PostgreSQL (fast shutdown).

        A stop signal while this runs (the second Ctrl-C) SIGKILLs whatever is still running.
        """
        self._stop.set()  # from here on, any stop signal means: kill
        if self._live_procs():
            self.console.print("stopping everything (Ctrl-C again to kill what is still running)")
        stopped_any = False
        for child in reversed(self.children):
            if child.proc is not None:
                began = time.monotonic()
                code = process.stop(child.proc, timeout=self.stop_timeout_s)
                if self._force.is_set():
                    self._announce_force()
                elif time.monotonic() - began >= self.stop_timeout_s:
                    self.console.print(f"[yellow]{child.spec.name} ignored SIGTERM for {self.stop_timeout_s:.0f}s "
                                       f"and was killed[/] ({describe_exit(code)})")
                child.proc = None
                stopped_any = True
            child.state = State.STOPPED
        for server in (self.broker, self.postgres):
            if server is not None and server.proc is not None:
                server.stop()
                stopped_any = True
        if self._force.is_set():
            self._announce_force()
        self.broker = self.postgres = None
        if self.children or stopped_any:
            try:
                state = json.loads(state_path(self.settings).read_text())
                if state.get("pid") == os.getpid():
                    state_path(self.settings).unlink()
            except (FileNotFoundError, json.JSONDecodeError):
                pass
        if stopped_any:
            self.console.print("stopped everything")

    def _live_procs(self) -> list[Popen[bytes]]:
        procs = [child.proc for child in self.children if child.proc is not None]
        procs += [server.proc for server in (self.broker, self.postgres) if server is not None and server.proc]
        return [proc for proc in procs if proc.returncode is None]

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        """First signal: stop in order. Any later one: SIGKILL everything still running, right now.

        Runs in the main thread between bytecodes, possibly inside a ``wait``: it only sends
        signals (no printing, no ``poll``); the waits return as the processes die, and
        :meth:`_shutdown` says what happened.
        """
        if not self._stop.is_set():
            self._stop.set()
            return
        self._force.set()
        for proc in self._live_procs():
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its session: the server and everything it forked
            except (ProcessLookupError, PermissionError):
                pass

    def _announce_force(self) -> None:
        if not self._force_announced:
            self._force_announced = True
            self.console.print("[red]second Ctrl-C: killed everything that was still stopping[/] (SIGKILL)")

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        # SIGHUP too: a closed terminal should stop PostgreSQL cleanly, not through the parent-death SIGKILL.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, self._on_stop_signal)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    # -- output --------------------------------------------------------------------------
    def _error(self, message: str) -> None:
        self.console.print(Text("error: ", style="bold red") + Text(message))

    def _show_tail(self, name: str, log_path: Path, *, since: int = 0) -> None:
        self.console.print(Text(f"--- last lines of {log_path} ({name}) ---", style="dim"))
        self.console.print(Text(tail(log_path, since=since)), highlight=False, soft_wrap=True)
        self.console.print(Text("---", style="dim"))

    def _table(self) -> Table:
        table = Table(title="pms up", title_justify="left")
        for column in ("service", "state", "pid", "address", "detail"):
            table.add_column(column)
        styles = {State.READY: "green", State.FAILED: "red", State.BACKOFF: "yellow", State.STARTING: "cyan"}
        now = time.monotonic()
        for child in self.children:
            spec = child.spec
            detail = ""
            if child.state is State.WAITING:
                waiting = [c.spec.name for c in self.children
                           if c.spec.name in spec.depends_on and c.state is not State.READY]
                detail = f"waits for {', '.join(waiting)}"
            elif child.state is State.STARTING:
                detail = f"{now - child.spawned_at:.1f}s"
            elif child.state is State.READY and child.ready_after_s is not None:
                detail = f"ready after {child.ready_after_s:.1f}s"
            elif child.state is State.BACKOFF:
                detail = f"in {max(0.0, child.restart_at - now):.1f}s (exit code {child.last_exit})"
            table.add_row(
                spec.name,
                Text(child.state.value, style=styles.get(child.state, "")),
                str(child.proc.pid) if child.proc else "",
                service_url(spec, self.settings),
                detail,
            )
        return table

    def _print_summary(self) -> None:
        settings = self.settings
        urls = Table.grid(padding=(0, 2))
        urls.add_column(style="bold")
        urls.add_column()
        names = {child.spec.name: child.spec for child in self.children}
        labels = {"gateway": "REST API (gateway)", "dashboard": "Dashboard", "analytics": "Analytics API",
                  "billing": "Billing gRPC"}
        if "gateway" in names:
            gateway = service_url(names["gateway"], settings)
            urls.add_row("REST API (gateway)", gateway)
            urls.add_row("API docs", f"{gateway}/api-docs/patient  (also /api-docs/auth, /api-docs/analytics)")
        for name, spec in names.items():
            if name != "gateway":
                urls.add_row(labels.get(name, name), service_url(spec, settings))
        urls.add_row("PostgreSQL", _dsn_without_password(settings.server_url()))
        urls.add_row("Analyst (read-only)", _dsn_without_password(settings.analyst_url()))
        if settings.mode is Mode.EMBEDDED:
            urls.add_row("DB passwords", str(settings.secrets_dir / "postgres-app.password")
                         + ", " + str(settings.secrets_dir / "postgres-analyst.password"))
        urls.add_row("Broker", settings.bootstrap_servers)
        urls.add_row("Logs", f"{settings.logs_dir}/<name>.log")
        self.console.print(f"\n[bold green]pms is up[/] ({settings.mode.value} mode, data in {settings.data_dir}); "
                           "Ctrl-C stops everything.")
        self.console.print(urls)
        self.console.print(self._admin_line(), highlight=False)

    def _admin_line(self) -> Text:
        settings = self.settings
        line = Text("Admin login: ", style="bold") + Text(settings.admin_email)
        if settings.admin_password is not None:
            return line + Text(" with the password from PMS_ADMIN_PASSWORD")
        if settings.mode is not Mode.EMBEDDED:
            return line + Text(" (no PMS_ADMIN_PASSWORD set: no admin password was generated)")
        password_file = settings.secrets_dir / ADMIN_PASSWORD_FILE
        marker = settings.data_dir / ADMIN_SHOWN_MARKER
        if marker.exists():
            return line + Text(f" -- password in {password_file} (printed on the first start only)")
        password = read_or_create_secret(password_file, nbytes=18)
        marker.touch()
        return line + Text(" / ") + Text(password, style="bold") + Text(
            f"  (shown this once; it stays in {password_file})")

    def _write_state(self) -> None:
        settings = self.settings
        servers: dict[str, Any] = {}
        if self.postgres is not None and self.postgres.proc is not None:
            servers["postgres"] = {"pid": self.postgres.proc.pid, "host": self.postgres.host,
                                   "port": self.postgres.port}
        if self.broker is not None and self.broker.proc is not None:
            servers["broker"] = {"pid": self.broker.proc.pid, "host": self.broker.host, "port": self.broker.port}
        state = {
            "pid": os.getpid(),
            "create_time": psutil.Process().create_time(),
            "started_at": self._started_at,
            "mode": settings.mode.value,
            "data_dir": str(settings.data_dir.resolve()),
            "servers": servers,
            "services": [
                {
                    "name": child.spec.name,
                    "pid": child.proc.pid if child.proc else None,
                    "state": child.state.value,
                    "host": child.spec.host(settings),
                    "port": child.spec.port(settings),
                    "probe": child.spec.probe.value,
                    "probe_path": child.spec.probe_path,
                    "url": service_url(child.spec, settings),
                    "restarts": child.total_restarts,
                }
                for child in self.children
            ],
        }
        _write_json_atomically(state_path(settings), state)


def _dsn_without_password(url: URL) -> str:
    """``postgresql://user@host:port/db``: where to connect, never the secret (URL.set keeps it)."""
    bare = URL.create("postgresql", username=url.username, host=url.host, port=url.port,
                      database=url.database, query=url.query)
    return bare.render_as_string(hide_password=False)


# -- pms status ----------------------------------------------------------------------------


def print_status(settings: Settings, *, console: Console | None = None) -> int:
    """Probe what the running ``pms up`` started and print a table.

    Returns:
        0 when every service answers, 1 when some do not, 3 when no supervisor runs.
    """
    console = console or Console()
    state = read_state(settings)
    if state is None:
        console.print(f"pms is not running (no live supervisor state in {state_path(settings)})")
        return EXIT_NOT_RUNNING
    table = Table(title=f"pms (pid {state['pid']}, up since {state['started_at']}, {state['mode']} mode)",
                  title_justify="left")
    for column in ("name", "status", "pid", "address", "restarts"):
        table.add_column(column)
    all_up = True
    for name, server in state.get("servers", {}).items():
        up = process.tcp_open(server["host"], int(server["port"]))
        all_up &= up
        table.add_row(name, _status_text(up), str(server["pid"]), _address(server["host"], server["port"]), "")
    for service in state.get("services", []):
        up = probe(service["probe"], service["host"], int(service["port"]), service["probe_path"])
        all_up &= up
        pid = service.get("pid")
        table.add_row(service["name"], _status_text(up), str(pid or ""), service["url"],
                      str(service.get("restarts", 0)))
    console.print(table)
    return EXIT_OK if all_up else EXIT_FAILED


def _status_text(up: bool) -> Text:
    return Text("up", style="green") if up else Text("down", style="red")
