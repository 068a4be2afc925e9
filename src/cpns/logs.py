"""Logging set-up for the three programs: plain or JSON lines (DESIGN §7).

Nothing here redacts: the rule is that key material never reaches a log call. The
message model hides secret fields from ``repr`` and :func:`cpns.messages.to_json`
redacts them, and a test scans the logs of a full run for every key it created.
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["setup_logging"]


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("txid", "entity", "status", "hop"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, sort_keys=True)


def setup_logging(*, json_lines: bool = False, level: str = "INFO") -> None:
    """Route the ``cpns`` loggers to stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("cpns")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
