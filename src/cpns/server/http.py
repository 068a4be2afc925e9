"""The server's HTTPS listener: uvicorn's httptools protocol with timeouts, caps and limits.

uvicorn with ``http="httptools"`` buffers request lines and headers without limit, and
its only timer is the keep-alive one, armed after a first response: a connection that
completes TLS and then sends nothing (or trickles a header a byte at a time) is never
closed, and enough of them exhaust the process's file descriptors. This module replaces
the protocol class (passed as ``http=`` to :class:`uvicorn.Config`) and does the TLS
handshake itself, so that every limit applies from the moment a connection is accepted:

* **Connection caps** (``max_connections``, ``max_connections_per_source``): checked
  when the TCP connection is accepted, before any TLS work; a connection over a cap is
  reset at once (no handshake, no HTTP response, no per-connection log line; refusals
  are summed in one log line at most every 10 s). The total cap is lowered at start to
  the open-file limit minus a reserve, so the process never runs out of descriptors
  (:func:`effective_limits`).
* **Request timeout** (``request_timeout``): from accept, the TLS handshake, the request
  line, the headers and the body must all arrive within this many seconds; the same
  budget starts again at the first byte of each later request on the connection. A
  connection that misses it is closed. Time the application spends answering is not
  counted.
* **Keep-alive timeout** (``keep_alive_timeout``): an idle connection between requests
  is closed after this many seconds (uvicorn's own timer).
* **Header limit** (``max_header_bytes``): the request line and headers together may
  not exceed this many bytes; a larger head is answered ``431 Request Header Fields Too
  Large`` and the connection is closed. Memory per connection stays within the limit
  plus one read (the parser is never fed a head past it).

The body limit (64 KiB) is the application's (:mod:`cpns.server.app`, 413).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import ssl
import time
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Final, cast

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cpns import metrics

__all__ = [
    "ConnectionTracker",
    "ListenerLimits",
    "LimitedHttpToolsProtocol",
    "effective_limits",
    "listener_protocol",
]

log = logging.getLogger("cpns.server.http")

#: Descriptors kept free for everything else the server opens (database, WAL, logs, TLS
#: files, the listening socket): the connection cap never exceeds RLIMIT_NOFILE minus this.
FD_RESERVE: Final = 64
#: Seconds a closing connection may linger (flushing its last response, TLS close_notify)
#: before it is cut.
_LINGER: Final = 5.0
#: Seconds between two summary lines about refused connections.
_REFUSAL_LOG_INTERVAL: Final = 10.0

_431: Final = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain\r\n"
    b"content-length: 32\r\n"
    b"connection: close\r\n"
    b"\r\n"
    b"request header fields too large\n"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerLimits:
    """What one server process allows its HTTPS connections (``server.toml`` knobs)."""

    #: Seconds from accept (or from a later request's first byte) for the TLS handshake,
    #: request line, headers and body to arrive.
    request_timeout: float = 10.0
    #: Seconds an idle keep-alive connection is kept between requests.
    keep_alive_timeout: float = 30.0
    #: Most bytes of request line plus headers; more is answered 431.
    max_header_bytes: int = 16 * 1024
    #: Most connections open at once (lowered to the descriptor limit minus a reserve).
    max_connections: int = 1024
    #: Most connections open at once from one source address.
    max_connections_per_source: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.request_timeout <= 3600:
            raise ValueError("request_timeout must be in (0, 3600] seconds")
        if not 0 < self.keep_alive_timeout <= 3600:
            raise ValueError("keep_alive_timeout must be in (0, 3600] seconds")
        if not 1024 <= self.max_header_bytes <= 1024 * 1024:
            raise ValueError("max_header_bytes must be 1024..1048576")
        if self.max_connections < 1 or self.max_connections_per_source < 1:
            raise ValueError("connection caps must be positive")


def effective_limits(limits: ListenerLimits) -> ListenerLimits:
    """``limits`` with the total cap lowered to RLIMIT_NOFILE minus :data:`FD_RESERVE`."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limits
    room = max(1, soft - FD_RESERVE)
    if limits.max_connections <= room:
        return limits
    log.warning(
        "max_connections lowered from %d to %d (open-file limit %d)",
        limits.max_connections,
        room,
        soft,
    )
    return replace(
        limits,
        max_connections=room,
        max_connections_per_source=min(limits.max_connections_per_source, room),
    )


class ConnectionTracker:
    """Open connections, in total and per source address; shared by one listener."""

    def __init__(self, limits: ListenerLimits) -> None:
        self._limits = limits
        self.total = 0
        self.by_source: dict[str, int] = {}
        #: Connections refused since the last summary line.
        self.refused = 0
        self._last_report = 0.0

    def admit(self, source: str) -> bool:
        """Count a new connection from ``source``; False (nothing counted) if over a cap."""
        current = self.by_source.get(source, 0)
        if (
            self.total >= self._limits.max_connections
            or current >= self._limits.max_connections_per_source
        ):
            cap = (
                "max_connections"
                if self.total >= self._limits.max_connections
                else "max_connections_per_source"
            )
            metrics.SERVER_CONNECTIONS_REFUSED.labels(cap).inc()
            self.refused += 1
            now = time.monotonic()
            if now - self._last_report >= _REFUSAL_LOG_INTERVAL:
                log.warning(
                    "refused %d connection(s) over the caps (open: %d, from this source: %d)",
                    self.refused,
                    self.total,
                    current,
                )
                self.refused = 0
                self._last_report = now
            return False
        self.total += 1
        self.by_source[source] = current + 1
        metrics.SERVER_CONNECTIONS.inc()
        return True

    def release(self, source: str) -> None:
        """Forget one connection from ``source``."""
        metrics.SERVER_CONNECTIONS.dec()
        self.total -= 1
        left = self.by_source.get(source, 1) - 1
        if left > 0:
            self.by_source[source] = left
        else:
            self.by_source.pop(source, None)


class _HeadTooLarge(Exception):
    """Raised inside a parser callback to stop parsing a head over the limit."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of :class:`ListenerLimits`.

    Use :func:`listener_protocol` to get a subclass bound to one listener's limits, TLS
    context and tracker. With a TLS context the listener must be created *without* TLS
    (``uvicorn.Config.ssl = None``): this protocol runs the handshake itself after the
    caps admitted the connection, under the request timeout.
    """

    limits: ClassVar[ListenerLimits] = ListenerLimits()
    tls: ClassVar[ssl.SSLContext | None] = None
    tracker: ClassVar[ConnectionTracker]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._source: str | None = None  # set once admitted
        self._started = False  # uvicorn's connection_made has run (TLS is up)
        self._finished = False
        self._raw: asyncio.Transport | None = None
        self._tls_task: asyncio.Task[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._awaiting_head = True
        self._head_bytes = 0
        self._parsed_head = 0
        self._refused = False
        self._early: list[bytes] = []
        #: Why the listener closed this connection (counted once, first reason wins).
        self._closed_for: str | None = None

    # -- accept, caps, TLS ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if not self.tracker.admit(source):
            self._finished = True
            transport.abort()  # over a cap: reset before any TLS work
            return
        self._source = source
        self.connections.add(self)
        self._arm_deadline()
        if self.tls is None:
            self._start(transport)
            return
        self._raw = transport
        # Started eagerly: start_tls hands the transport to the TLS protocol before this
        # method returns (uvloop starts reading right after connection_made, so a
        # pause_reading here would not hold; bytes that arrive before the handshake
        # starts wait in the TLS protocol's input buffer).
        self._tls_task = asyncio.Task(
            self._handshake(transport, self.tls), loop=self.loop, eager_start=True
        )

    async def _handshake(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        try:
            secure = await self.loop.start_tls(
                raw,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self.limits.request_timeout,
            )
        except asyncio.CancelledError:
            raw.abort()
            self._finish()
            raise
        except Exception:  # handshake failed, timed out, or the peer went away
            self._closed_by_limit("tls_handshake_failed")
            raw.abort()
            self._finish()
            return
        if self._finished or secure is None:
            if secure is not None:
                secure.abort()
            return
        self._start(secure)

    def _start(self, transport: asyncio.Transport) -> None:
        self._started = True
        super().connection_made(transport)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._started:
            super().connection_lost(exc)
        self._finish()

    def _finish(self) -> None:
        """Release everything this connection holds; idempotent."""
        if self._finished and self._source is None:
            return
        self._finished = True
        self._cancel_deadline()
        self.connections.discard(self)
        if self._source is not None:
            self.tracker.release(self._source)
            self._source = None

    def shutdown(self) -> None:
        """Server stopping: a connection still in its handshake is cut."""
        if self._started:
            super().shutdown()
            return
        if self._tls_task is not None:
            self._tls_task.cancel()
        if self._raw is not None:
            self._raw.abort()
        self._finish()

    # -- request timeout ------------------------------------------------------------------

    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(self.limits.request_timeout, self._on_deadline)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_deadline(self) -> None:
        self._deadline = None
        self._closed_by_limit("request_timeout")
        if self._started:
            self.transport.abort()
        elif self._raw is not None:
            if self._tls_task is not None:
                self._tls_task.cancel()
            self._raw.abort()
        else:  # pragma: no cover - plain listener: started at once
            return

    # -- header limit ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self._started:
            # Decrypted bytes can arrive between the end of the handshake and the moment
            # the handshake task resumes: keep them for _start (at most one TLS read).
            self._early.append(data)
            return
        if self._refused:
            return  # a refused head: whatever else arrives is dropped
        self._unset_keepalive_if_required()
        if self._awaiting_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()
            self.send_400_response("Upgrade is not supported.")
            return
        except httptools.HttpParserError:
            if not self._refused:
                self.send_400_response("Invalid HTTP request received.")
            return
        if self._awaiting_head and self._head_bytes > self.limits.max_header_bytes:
            self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_head = True
        if self._deadline is None:
            self._arm_deadline()  # a later request on the connection: a new budget

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        # Parsed size of this head (the raw count above may include a previous body).
        self._parsed_head += size
        if self._parsed_head > self.limits.max_header_bytes:
            self._refuse_head()
            raise _HeadTooLarge

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._head_bytes = 0
        self._parsed_head = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._cancel_deadline()  # the whole request is in: the application's time is free
        super().on_message_complete()

    def _refuse_head(self) -> None:
        if self._refused:
            return
        self._refused = True
        self._cancel_deadline()
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.abort()  # a response is under way: no room for a 431
            return
        self._closed_by_limit("head_too_large")
        log.info(
            "431 to %s: request head over %d bytes", self._source, self.limits.max_header_bytes
        )
        self.transport.write(_431)
        self.transport.close()
        self.loop.call_later(_LINGER, self._cut)

    def _closed_by_limit(self, reason: str) -> None:
        """Count this connection once in ``cpns_server_connections_closed``."""
        if self._closed_for is None:
            self._closed_for = reason
            metrics.SERVER_CONNECTIONS_CLOSED.labels(reason).inc()

    def _cut(self) -> None:
        with contextlib.suppress(Exception):
            self.transport.abort()


def listener_protocol(
    limits: ListenerLimits, tls: ssl.SSLContext | None
) -> type[LimitedHttpToolsProtocol]:
    """A protocol class for one listener: pass it as ``http=`` to :class:`uvicorn.Config`
    and leave ``Config.ssl`` unset (the class does the TLS handshake with ``tls``)."""

    class CPNSHttpProtocol(LimitedHttpToolsProtocol):
        pass

    CPNSHttpProtocol.limits = limits
    CPNSHttpProtocol.tls = tls
    CPNSHttpProtocol.tracker = ConnectionTracker(limits)
    return CPNSHttpProtocol
