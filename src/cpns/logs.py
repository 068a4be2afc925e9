"""Logging set-up for the three programs: plain or JSON lines (DESIGN §7).

Nothing here redacts: the rule is that key material never reaches a log call. The
message model hides secret fields from ``repr`` and :func:`cpns.messages.to_json`
redacts them, and a test scans the logs of a full run for every key it created.

Peer input (a reason quoting a peer's bytes, a header value, a path) goes through
:func:`peer_text` before it reaches a log line: cut to a bound with a note of the full
length, control and non-ASCII characters escaped, so that no peer can make one request
write kilobytes of log or forge a line break.
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["PEER_TEXT_MAX", "peer_text", "setup_logging"]

#: Most characters of one piece of peer input that :func:`peer_text` lets into a log line.
PEER_TEXT_MAX = 120


def peer_text(value: object, limit: int = PEER_TEXT_MAX) -> str:
    """``value`` (text, or bytes shown in hex) made safe for one log line.

    At most ``limit`` characters of it are kept, control and non-ASCII characters are
    escaped (``\\n``, ``\\x1b``, ``\\u2028``), and a cut value ends with ``...[N chars]``
    (``[N bytes]`` for bytes). The result is never longer than ``limit + 30`` characters.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        shown = raw[: max(1, limit // 2)].hex()
        return shown if len(raw) <= limit // 2 else f"{shown}...[{len(raw)} bytes]"
    text = value if isinstance(value, str) else str(value)
    escaped = ascii(text[:limit])[1:-1]
    if len(text) <= limit and len(escaped) <= limit:
        return escaped
    return f"{escaped[:limit]}...[{len(text)} chars]"


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
