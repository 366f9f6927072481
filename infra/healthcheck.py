"""Container health check: ``python -m infra.healthcheck [NAME]`` exits 0 when the service is ready.

One image runs every service, so the Dockerfile's HEALTHCHECK, the compose healthchecks
and the ECS task definitions all call this one module; it asks the registry how the
service is probed (HTTP ``probe_path`` or the gRPC health service) and on which port.

The service name comes from the argument, else ``PMS_SERVICE``, else the container's
main command line (``pms serve NAME``), so the Dockerfile's HEALTHCHECK needs no
per-service configuration.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from pms import probe
from pms.registry import ServiceSpec, by_name

#: Seconds one probe may take; the orchestrator's own timeout is the outer bound.
PROBE_TIMEOUT_S = 3.0


def service_from_cmdline(cmdline: bytes) -> str | None:
    """The NAME of a ``... serve NAME`` command line (NUL-separated, as in /proc/N/cmdline)."""
    args = [part.decode(errors="replace") for part in cmdline.split(b"\0") if part]
    for index, arg in enumerate(args[:-1]):
        if arg == "serve":
            return args[index + 1]
    return None


def resolve_service(argv: list[str], environ: Mapping[str, str]) -> str:
    """Pick the service to probe: argument, then ``PMS_SERVICE``, then PID 1's command line."""
    if argv:
        return argv[0]
    if environ.get("PMS_SERVICE"):
        return environ["PMS_SERVICE"]
    for pid in ("1", str(os.getppid())):
        try:
            name = service_from_cmdline(Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:
            continue
        if name:
            return name
    raise LookupError("no service to check: pass NAME, set PMS_SERVICE, or run `pms serve NAME` as the main process")


def check(spec: ServiceSpec, *, host: str, port: int) -> bool:
    """Whether ``spec`` answers its readiness probe on ``host:port``."""
    return probe.ready(spec, host=host, port=port, timeout=PROBE_TIMEOUT_S)


def _local_host(bind_host: str) -> str:
    # A service bound to every interface is probed over loopback from inside its container.
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "") else bind_host


def main(argv: list[str] | None = None) -> int:
    from pms.settings import get_settings

    args = sys.argv[1:] if argv is None else argv
    try:
        spec = by_name(resolve_service(args, os.environ))
    except (LookupError, KeyError) as exc:
        sys.stderr.write(f"healthcheck: {exc}\n")
        return 2
    settings = get_settings()
    healthy = check(spec, host=_local_host(spec.host(settings)), port=spec.port(settings))
    if not healthy:
        sys.stderr.write(f"healthcheck: {spec.name} is not ready\n")
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
