"""A private full stack for the fault suite: its own PostgreSQL and broker, every service a real process.

The fault module kills PostgreSQL and the broker, so it never uses the session servers that
other test modules share: :func:`private_stack` starts a fresh embedded PostgreSQL + Tansu
on free ports in a new data dir (outside pytest's temp root, see tests/fixtures/servers.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from pms import process
from pms.embedded import EmbeddedBroker, EmbeddedPostgres, libpq_dsn
from pms.registry import by_name, serve_command
from pms.security import encode_token
from pms.settings import KafkaSettings, PostgresSettings, Settings, child_env
from tests.fixtures.servers import TEST_AUTH_LIMITS, server_data_dir
from tests.fixtures.services import ServiceProcess

#: Start waves: each wave starts in parallel, after the previous one is ready (dependencies first).
STACK: tuple[tuple[str, ...], ...] = (("billing", "auth", "pipeline"), ("patient", "analytics"), ("gateway",))
#: Test-speed knobs: fast outbox polling and billing retries, and no rate limit in the way of the load.
PATIENT_KNOBS: dict[str, Any] = {
    "seed_demo_data": False, "outbox_poll_interval_s": 0.05, "billing_retry_initial_s": 0.2,
    "billing_retry_max_s": 1.0, "billing_timeout_s": 1.0,
}


def stack_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings with free ports for the servers and every service, and test-speed knobs."""
    port = process.free_port
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "postgres": PostgresSettings(port=port()),
        "kafka": KafkaSettings(bootstrap_servers=f"127.0.0.1:{port()}"),
        "patient": {"port": port(), **PATIENT_KNOBS},
        "auth": {"port": port(), **TEST_AUTH_LIMITS},
        "gateway": {"port": port(), "rate_limit_per_minute": 1_000_000, "upstream_timeout_s": 10.0},
        "analytics": {"port": port()},
        "billing": {"port": port(), "metrics_port": port()},
        "dashboard": {"port": port()},
        "pipeline": {"port": port()},
        "log_level": "INFO",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@dataclass(frozen=True, slots=True)
class Exit:
    """A service that went down or stuck without being killed, and the last error its log shows."""

    service: str
    what: str
    last_error: str
    #: The end of its log without access lines and broker reconnect noise (a crash dump shows here).
    tail: str = ""


_NOISE = ('"logger": "pms.access"', "Connect to ipv4", "brokers are down", "AuthlibDeprecationWarning",
          "from ._compat import")


def _signal(log_tail: str, lines: int = 25) -> str:
    """The end of a log without the lines that say nothing about why a process went down."""
    kept = [line for line in log_tail.splitlines() if line.strip() and not any(n in line for n in _NOISE)]
    return "\n".join(kept[-lines:])


def _last_error(log_tail: str) -> str:
    """The last exception line of a log tail (type and message; our logs carry no patient data)."""
    lines = [line for line in log_tail.splitlines() if line.strip() and not any(n in line for n in _NOISE)]
    for line in reversed(lines):
        text = line.strip()
        if ("Error" in text or "Exception" in text) and not text.startswith(("File ", "{")) and ":" in text:
            return text[:300]
    return lines[-1][:300] if lines else ""


@dataclass
class Stack:
    """The running stack: servers, services by name, and the settings they share."""

    settings: Settings
    postgres: EmbeddedPostgres | None
    broker: EmbeddedBroker | None
    log_dir: Path
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    #: Services that exited on their own or had to be restarted although the test did not kill them.
    exits: list[Exit] = field(default_factory=list)

    @property
    def gateway_url(self) -> str:
        return self.services["gateway"].base_url

    def token(self, role: str, sub: str = "fault-suite") -> str:
        return encode_token(self.settings, sub=sub, role=role)

    def start_services(self, names: tuple[str, ...], *, timeout: float = 90.0) -> None:
        """Start ``names`` at once and wait until all are ready (start-up is mostly imports).

        Spawned from this thread on purpose: children get a parent-death signal, which Linux ties
        to the spawning *thread*, so a helper thread's exit would kill them.
        """
        env = child_env(self.settings)
        processes = {name: ServiceProcess(name, self.settings, self.log_dir / f"{name}.log") for name in names}
        self.services.update(processes)
        for name, svc in processes.items():
            svc.proc = process.spawn(serve_command(by_name(name)), log_path=svc.log_path,
                                     env=env)

        def ready() -> bool:
            return all(svc.is_ready() for svc in processes.values())

        def alive() -> bool:
            return all(svc.proc is not None and svc.proc.poll() is None for svc in processes.values())

        try:
            process.wait_until(ready, timeout=timeout, interval=0.1, message=f"{', '.join(names)} to be ready",
                               alive=alive)
        except (TimeoutError, RuntimeError) as exc:
            codes = {name: svc.proc.poll() if svc.proc is not None else "not started"
                     for name, svc in processes.items()}
            raise RuntimeError(f"{exc}; exit codes (None = running): {codes}\n{self.log_tails()}") from exc

    def revive_dead(self) -> list[Exit]:
        """Restart every service that exited on its own, as ``pms up``'s supervisor would."""
        dead = []
        for name, svc in self.services.items():
            if svc.proc is not None and svc.proc.poll() is not None:
                tail = svc.log_tail(400)
                dead.append(Exit(name, f"exited with code {svc.proc.returncode}", _last_error(tail), _signal(tail)))
                svc.proc = None
                svc.start(timeout=90)
        self.exits.extend(dead)
        return dead

    def restart_stuck(self, name: str, why: str) -> None:
        """Restart a service that is up but not working (as an operator would), and record it."""
        svc = self.services[name]
        tail = svc.log_tail(400)
        self.exits.append(Exit(name, why, _last_error(tail), _signal(tail)))
        svc.stop()
        svc.start(timeout=90)

    def all_ready(self) -> bool:
        self.revive_dead()
        return all(svc.proc is not None and svc.is_ready() for svc in self.services.values())

    def wait_all_ready(self, *, timeout: float = 60.0) -> None:
        process.wait_until(self.all_ready, timeout=timeout, interval=0.1, message="every service to be ready")

    def sql(self, database: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(libpq_dsn(self.settings.database_url_for(database)), connect_timeout=5) as conn:
            return conn.execute(query, params).fetchall()

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(f"--- {name} ---\n{svc.log_tail(lines)}" for name, svc in self.services.items())

    def stop(self) -> None:
        for svc in reversed(list(self.services.values())):
            svc.stop()


@contextmanager
def private_stack(waves: tuple[tuple[str, ...], ...] = STACK, **overrides: Any) -> Iterator[Stack]:
    """Fresh embedded PostgreSQL + broker and the services of ``waves`` as real processes; all stopped afterwards."""
    with ExitStack() as cleanup:
        data_dir = cleanup.enter_context(server_data_dir(prefix="pms-faults-"))
        settings = stack_settings(data_dir, **overrides)
        postgres, broker = EmbeddedPostgres(settings), EmbeddedBroker(settings)
        postgres.start()
        cleanup.callback(lambda: postgres.stop())
        broker.start()
        cleanup.callback(lambda: broker.stop())
        stack = Stack(settings, postgres, broker, settings.logs_dir)
        cleanup.callback(stack.stop)
        for wave in waves:
            stack.start_services(wave)
        yield stack
