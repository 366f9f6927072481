"""Run the dashboard as a platform service (``pms serve dashboard``; registry target ``dashboard.serve:run``).

The Streamlit server replaces this process (``exec``), so the supervisor's PID, its SIGTERM
and the parent-death signal reach Streamlit itself and nothing is left behind. The gateway
URL is passed as a script argument (``-- --gateway-url=…``). The dashboard is the public,
browser-facing process and only ever calls the gateway, so the platform's secrets (JWT
signing key, database URLs, the first admin's password) are removed from its environment.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pms import forwarding
from pms.settings import SECRET_VARIABLES, Settings, child_env

APP = Path(__file__).resolve().parent / "streamlit_app.py"
GATEWAY_ARG = "--gateway-url="


def command(settings: Settings) -> list[str]:
    """The ``streamlit run`` command line for ``settings`` (headless, no telemetry, no file watcher)."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.headless=true",
        f"--server.address={settings.dashboard.host}",
        f"--server.port={settings.dashboard.port}",
        "--server.fileWatcherType=none",
        "--server.runOnSave=false",
        "--browser.gatherUsageStats=false",
        "--global.developmentMode=false",
        "--client.toolbarMode=viewer",
        "--client.showErrorDetails=none",
        "--theme.primaryColor=#2563eb",
        "--logger.level=warning",
        "--",
        f"{GATEWAY_ARG}{settings.gateway.base_url}",
    ]


def environment(settings: Settings) -> dict[str, str]:
    # The dashboard holds no secret that signs tokens or opens a database; only the derived key that lets
    # it vouch for its users' addresses at the gateway.
    env = child_env(settings)
    for name in SECRET_VARIABLES:
        env.pop(name, None)
    env["PMS_GATEWAY__URL"] = settings.gateway.base_url
    # Not the JWT key: a key derived from it that can only vouch for a browser's address (pms.forwarding).
    env[forwarding.KEY_VARIABLE] = forwarding.key_for(settings).hex()
    env["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] = "false"
    # Streamlit serves through uvicorn, which by default believes X-Forwarded-For from 127.0.0.1: the address
    # the sign-in page vouches for at the gateway must be the browser's (behind the load balancer: the
    # address it appended), never one a local client wrote. Same trusted proxies as the gateway.
    env["FORWARDED_ALLOW_IPS"] = settings.public_forwarded_allow_ips
    return env


def run(settings: Settings) -> None:
    """Serve the dashboard on ``settings.dashboard.host:port`` until stopped."""
    argv = command(settings)
    os.execve(sys.executable, argv, environment(settings))  # noqa: S606 - fixed argv, no shell
