"""Run one registered service in this process (``pms serve NAME``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from pms.logs import configure_logging
from pms.registry import Kind, by_name
from pms.settings import Settings, get_settings


def load_target(target: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def serve(name: str, settings: Settings | None = None) -> None:
    """Run service ``name`` until it is stopped (SIGTERM/SIGINT)."""
    settings = settings or get_settings()
    spec = by_name(name)
    configure_logging(settings.log_level)
    target = load_target(spec.target)
    if spec.kind is Kind.ASGI:
        import uvicorn

        app = target(settings)
        trusted = settings.public_forwarded_allow_ips if spec.public else settings.forwarded_allow_ips
        uvicorn.run(
            app,
            host=spec.host(settings),
            port=spec.port(settings),
            log_config=None,
            access_log=False,
            proxy_headers=bool(trusted.strip()),
            forwarded_allow_ips=trusted,
            timeout_graceful_shutdown=5,
        )
    else:
        target(settings)
