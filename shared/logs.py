"""Structured logs: one JSON object per line, constant event names, data in fields.

Prompts, completions and secrets are never passed to a log call (see ``log_content``);
tracebacks are logged without local variables. As a last line of defence every text field
of a record (the event, extra fields, an error and its traceback) goes through
``shared.redact`` before it is written: a key or an e-mail address that slipped into an
exception message comes out as ``[REDACTED_...]``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

from shared.redact import redact

_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """Formats a record as one JSON line: time, level, logger, event, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                entry[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = self.formatException(record.exc_info)
        for key, value in entry.items():
            if isinstance(value, str):  # a last line of defence: see shared.redact
                entry[key] = redact(value)[0]
        return orjson.dumps(entry, default=str).decode()


def setup_logging(level: str = "INFO") -> None:
    """Send every logger's records to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
