"""Logging set-up for the three programs: plain or JSON lines (docs/logging.md).

Every line names its *party* (``server``, ``gateway``, ``pne``, or ``cli`` for the other
commands) and, while a flow is being handled, its *flow ID* (the correlation ID carried in
the messages, header key 7 of docs/wire.md). The I/O shells set the flow with
:func:`flow_scope` (a context variable, so concurrent requests in one process keep
theirs); :class:`ContextFilter` copies it, and the party, onto each record; the
formatters write them. Structured extras (``extra={...}``) become JSON fields, or
``key=value`` pairs after the message in text mode.

Nothing here redacts: the rule is that key material never reaches a log call. The
message model hides secret fields from ``repr`` and :func:`cpns.messages.to_json`
redacts them, and a test scans the logs of a full run for every key it created.

Peer input (a reason quoting a peer's bytes, a header value, a path) goes through
:func:`peer_text` before it reaches a log line: cut to a bound with a note of the full
length, control and non-ASCII characters escaped, so that no peer can make one request
write kilobytes of log or forge a line break.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Final, Literal, TextIO

__all__ = [
    "LOG_FORMATS",
    "LogBudget",
    "PARTIES",
    "PEER_TEXT_MAX",
    "ContextFilter",
    "JSONFormatter",
    "TextFormatter",
    "current_flow",
    "flow_scope",
    "peer_text",
    "setup_logging",
]

#: Accepted values of ``--log-format`` and ``CPNS_LOG_FORMAT``.
LOG_FORMATS: Final = ("text", "json")
#: What the ``party`` field says: the program that wrote the line.
PARTIES: Final = ("server", "gateway", "pne", "cli")

type LogFormat = Literal["text", "json"]

#: The flow (correlation) ID being handled in this context, as 16 hex digits, or None.
_FLOW: ContextVar[str | None] = ContextVar("cpns_flow", default=None)

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


def current_flow() -> str | None:
    """The flow ID (hex) of the flow being handled in this context, or None."""
    return _FLOW.get()


@contextlib.contextmanager
def flow_scope(flow: str | None) -> Iterator[None]:
    """Log every line inside the block with ``flow`` (hex; None: no flow).

    A context variable: each asyncio task (each request, each PAN link) has its own.
    """
    token = _FLOW.set(flow)
    try:
        yield
    finally:
        _FLOW.reset(token)


_PLAIN_RECORD: Final = vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))
#: LogRecord attributes that are not structured extras.
_STANDARD: Final = frozenset(_PLAIN_RECORD) | {"message", "asctime", "party", "flow", "taskName"}
#: How many attributes LogRecord.__init__ sets, always first: extras come after them.
_INIT_ATTRIBUTES: Final = len(_PLAIN_RECORD)


def _extras(record: logging.LogRecord) -> dict[str, object]:
    """The structured extras of ``record`` (``extra={...}``), JSON-ready."""
    out: dict[str, object] = {}
    attributes = vars(record)
    if len(attributes) <= _INIT_ATTRIBUTES:
        return out
    # Only what was added after __init__ (in the order added) can be an extra.
    for key, value in list(attributes.items())[_INIT_ATTRIBUTES:]:
        if key in _STANDARD or key.startswith("_"):
            continue
        if not isinstance(value, str | int | float | bool) and value is not None:
            # repr, not str: str() of bytes is an error under `python -bb` (scripts/test).
            value = repr(value) if isinstance(value, bytes | bytearray) else str(value)
        out[key] = value
    return out


#: (second, its formatted date and time): every line of one second shares them.
_second: tuple[int, str] = (-1, "")


def _timestamp(record: logging.LogRecord) -> str:
    """RFC 3339 UTC with milliseconds: ``2026-12-02T04:05:06.789Z``."""
    global _second
    second, text = _second
    if second != int(record.created):
        second = int(record.created)
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = (second, text)
    return f"{text}.{int(record.msecs):03d}Z"


class ContextFilter(logging.Filter):
    """Adds ``party`` and the context's ``flow`` to every record a handler writes.

    A record that already has a ``flow`` (``extra={"flow": ...}``) keeps it.
    """

    def __init__(self, party: str) -> None:
        super().__init__()
        self.party = party

    def filter(self, record: logging.LogRecord) -> bool:
        record.party = self.party
        if getattr(record, "flow", None) is None:
            record.flow = _FLOW.get()
        return True


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ts, level, party, logger, msg, flow (when known), the
    structured extras, and exc (a traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "party": getattr(record, "party", "cli"),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        flow = getattr(record, "flow", None)
        if flow is not None:
            out["flow"] = flow
        for key, value in _extras(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class TextFormatter(logging.Formatter):
    """``ts LEVEL party logger: msg [flow=... key=value ...]`` (same ts as JSON)."""

    def format(self, record: logging.LogRecord) -> str:
        pairs = {}
        flow = getattr(record, "flow", None)
        if flow is not None:
            pairs["flow"] = flow
        pairs.update(_extras(record))
        tail = " [" + " ".join(f"{k}={v}" for k, v in pairs.items()) + "]" if pairs else ""
        line = (
            f"{_timestamp(record)} {record.levelname} {getattr(record, 'party', 'cli')} "
            f"{record.name}: {record.getMessage()}{tail}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(
    *,
    json_lines: bool = False,
    level: str = "INFO",
    party: str = "cli",
    stream: TextIO | None = None,
) -> None:
    """Route the ``cpns`` loggers to stderr (or ``stream``), as text or JSON lines."""
    # Record fields neither formatter writes are not computed for every line (the logging
    # HOWTO's "Optimization"): a daemon logs a few lines per request.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined]  # 3.12+, not in typeshed
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JSONFormatter() if json_lines else TextFormatter())
    handler.addFilter(ContextFilter(party))
    root = logging.getLogger("cpns")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class LogBudget:
    """A token bucket for log lines that peers or outages can cause in bulk: up to
    ``burst`` lines at once, then ``rate`` lines per second; it counts the lines it
    refused so the next allowed line can say how many were left out."""

    def __init__(self, *, rate: float = 1.0, burst: int = 20) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last: float | None = None
        self._dropped = 0

    def take(self, now: float) -> tuple[bool, int]:
        """(whether a line may be written now, how many were refused since the last one)."""
        if self._last is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1.0:
            self._dropped += 1
            return False, 0
        self._tokens -= 1.0
        dropped, self._dropped = self._dropped, 0
        return True, dropped
