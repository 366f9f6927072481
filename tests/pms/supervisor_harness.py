"""Run a real :class:`~pms.supervisor.Supervisor` over stand-in services, as its own process.

``python -m tests.pms.supervisor_harness`` reads its settings from ``PMS_*`` (as ``pms up``
does) and the stand-ins from ``PMS_TEST_SUPERVISOR`` (JSON): ``services`` (name, mode,
section, probe, depends_on), optional ``only``, ``policy``, ``ready_timeout_s`` and ``stop_timeout_s``
(without them the supervisor uses ``settings.supervisor``, like ``pms up``).
"""

from __future__ import annotations

import json
import os
import sys

from pms.registry import Kind, Probe, ServiceSpec
from pms.settings import Settings
from pms.supervisor import RestartPolicy, Supervisor, hangup_safe_console

CONFIG_ENV = "PMS_TEST_SUPERVISOR"


def fake_specs(services: list[dict[str, object]]) -> list[ServiceSpec]:
    return [
        ServiceSpec(
            name=str(item["name"]),
            description=f"stand-in ({item['mode']})",
            kind=Kind.CALLABLE,
            target=f"tests.pms.fake_service:{item['mode']}",
            section=str(item["section"]),
            probe=Probe(str(item.get("probe", "http"))),
            depends_on=tuple(item.get("depends_on", ())),  # type: ignore[arg-type]
        )
        for item in services
    ]


def main() -> int:
    config = json.loads(os.environ[CONFIG_ENV])
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    specs = fake_specs(config["services"])

    def command(spec: ServiceSpec) -> list[str]:
        mode = spec.target.rpartition(":")[2]
        return [sys.executable, "-m", "tests.pms.fake_service", mode, str(spec.port(settings))]

    supervisor = Supervisor(
        settings,
        only=config.get("only"),
        services=specs,
        command=command,
        # Unset here: the supervisor takes them from settings.supervisor (PMS_SUPERVISOR__*), as `pms up` does.
        policy=RestartPolicy(**config["policy"]) if "policy" in config else None,
        ready_timeout_s=float(config["ready_timeout_s"]) if "ready_timeout_s" in config else None,
        stop_timeout_s=float(config["stop_timeout_s"]) if "stop_timeout_s" in config else None,
        console=hangup_safe_console(width=200, force_terminal=False, color_system=None),
    )
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
