"""Structured (one JSON object per line) logging for every process.

Never pass patient data (names, emails, phones, addresses, search terms) to a logger:
log ids, counts, statuses and timings only.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            payload.update(extra)
        if record.exc_info and record.exc_info[0] is not None:
            payload["exc_type"] = record.exc_info[0].__name__
        return json.dumps(payload, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Send JSON lines to stderr (the supervisor appends them to the service's log file)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log prints raw query strings, which can hold patient names: silence it.
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs every request's full URL (query included) at INFO: same risk, keep only its warnings.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
