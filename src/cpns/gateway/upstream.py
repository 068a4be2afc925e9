"""The PN GW's link to the CPNS Server: HTTPS + HTTP Digest (DESIGN §2, CPNS-2 / CPNS-7).

One CPNS message goes up per ``POST {server}/cpns/v1/messages`` and one comes back. This
module owns everything about that hop and nothing about the procedures:

* **Server authentication by certificate.** TLS 1.3 only, trusting exactly the
  certificate file given with ``--ca`` (the server's self-signed certificate), never the
  system store: a gateway must not accept any CA-signed impostor.
* **Entity authentication by Digest** (004 §5.x.2): username = the gateway's Entity ID,
  password = its EUKey as lowercase hex. The first request goes without credentials,
  the 401 brings the challenge, and later requests on the keep-alive connection reuse
  the nonce (``nc`` counts up) so only the first costs a round trip. A 401 on a request
  that carried credentials (a stale or forgotten nonce) is answered once with the new
  challenge; a second 401 means the server does not accept our key.
* **Server authentication by rspauth.** Every 200 to an authenticated request must carry
  ``Authentication-Info`` whose ``rspauth`` proves the server holds our EUKey; a reply
  without it, or with a wrong one, is rejected (DESIGN §5: every relayed message is
  authenticated). The gateway's own with-UI enrolment request
  (:class:`UserKeyAssignmentRequest`) is the exception: we have no EUKey yet, and the
  proof travels inside the message. An enrolled gateway authenticates every request,
  so a PNE's with-UI request it relays from the PAN goes with Digest too: the server
  knows, and audits, which PN GW relayed it.
* **Bounded, idempotent retries** (DESIGN §5). A connection error, timeout or 5xx is
  retried a bounded number of times with the *identical body*: the server keeps the
  reply of every transaction ID and answers a retry with it, so a retry after a lost
  response cannot assign twice. Each try has its own timeout, so the whole exchange is
  bounded by ``tries x per_try_timeout`` plus the backoff (the per-hop budget).

Failures are typed and name the hop: :class:`~cpns.errors.TransportError` when the
server cannot be reached or answers outside the contract, :class:`UpstreamAuthFailed`
(an :class:`~cpns.errors.AuthenticationFailed`) when Digest fails either way.

Concurrency. The Digest client state (nonce, ``nc``, expected rspauth) belongs to one
request at a time, and the server accepts each nonce's ``nc`` values only in increasing
order. Up to ``lanes`` exchanges therefore run at once, each on its own *lane*: a Digest
client with its own nonce, used by one request at a time, so every nonce's ``nc`` still
reaches the server in order while the lanes overlap their round trips (and the server's
group commits). A lane costs one extra 401 round trip the first time it is used.

HTTP. Each lane also owns one persistent HTTP/1.1 connection (TLS over asyncio streams,
framed by h11, the sans-I/O HTTP/1.1 library uvicorn uses too), opened when the lane is
first used and kept while the server keeps it. A connection the server has closed
between two requests (its keep-alive timeout, a ``Connection: close``, a restarted
worker) is noticed before reuse, or at the latest when the request finds it closed
before any byte of the answer, and the request goes again at once on a new connection
(not counted as a retry). Nothing else is shared between lanes, so a request costs no
pool bookkeeping: this client spends a fraction of the CPU httpx did (benchmarks/
gateway_cpu.py, docs/architecture.md). A reply body larger than the largest CPNS message
(:data:`~cpns.messages.constants.MAX_MESSAGE_SIZE`) is refused without reading it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import urlsplit

import h11

from cpns import metrics
from cpns.errors import AuthenticationFailed, ConfigurationError, DecodeError, TransportError
from cpns.flow import log_hop, stamp
from cpns.messages.codec import decode, encode
from cpns.messages.constants import MAX_MESSAGE_SIZE
from cpns.messages.model import ErrorMessage, Message, UserKeyAssignmentRequest
from cpns.protocol.digest import DigestClient
from cpns.runtime import SystemRandom
from cpns.types import Random

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram

__all__ = [
    "HOP",
    "MESSAGES_PATH",
    "ServerClient",
    "Upstream",
    "UpstreamAuthFailed",
    "tls_context",
]

log = logging.getLogger("cpns.gateway.upstream")

#: Path of the protocol endpoint on the CPNS Server.
MESSAGES_PATH: Final = "/cpns/v1/messages"
#: Hop name used in errors and logs for this link.
HOP: Final = "gateway->server"

_CBOR: Final = "application/cbor"
_RETRYABLE_STATUS: Final = frozenset({500, 502, 503, 504})
#: Largest status line + headers accepted from the server (h11 refuses more).
_MAX_HEAD: Final = 16 * 1024
#: Largest reply body accepted: one CPNS message.
_MAX_BODY: Final = MAX_MESSAGE_SIZE
_READ_SIZE: Final = 64 * 1024
_USER_AGENT: Final = "cpns-gateway"


class Upstream(Protocol):
    """What the daemon needs from the server link (tests inject a fake)."""

    async def exchange(self, message: Message) -> Message:
        """Send ``message``; return the server's answer (see :meth:`ServerClient.exchange`)."""
        ...


class UpstreamAuthFailed(AuthenticationFailed):
    """Digest failed on the server link; ``hop`` says which side refused.

    ``"server"``: the server refused our credentials (401 after answering a challenge).
    ``"gateway"``: we refused the server (rspauth missing or wrong).
    """

    def __init__(self, reason: str, *, hop: str) -> None:
        super().__init__(reason)
        self.hop = hop


def tls_context(ca_file: Path | str) -> ssl.SSLContext:
    """Client TLS context: TLS 1.3 only, trusting exactly ``ca_file`` (the server's cert).

    Raises:
        ConfigurationError: the file cannot be read or holds no certificate (a setting to
            fix, not a peer to wait for).
    """
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load the server certificate {ca_file}: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


@dataclass(frozen=True, slots=True)
class _Response:
    """One HTTP answer, read whole."""

    status: int
    #: (lower-case name, value) pairs as h11 gives them.
    headers: list[tuple[bytes, bytes]]
    content: bytes

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None

    def header_list(self, name: bytes) -> list[str]:
        """Every value of header ``name`` (lower case), in order."""
        return [value.decode("latin-1") for key, value in self.headers if key == name]


class _Stale(Exception):
    """A reused keep-alive connection turned out closed before any byte of the answer:
    the server closed it while idle. The request may go again on a new connection."""


class _Oversize(Exception):
    """The reply is larger than :data:`_MAX_BODY` (not retried: outside the contract)."""


class _Connection:
    """One HTTP/1.1 connection: asyncio streams for the bytes, h11 for the framing.

    Used by one request at a time (its lane's). Any failure, timeout or cancellation
    in the middle of a request closes it, since its framing state is then unknown.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
        self.used = False

    @property
    def reusable(self) -> bool:
        """Whether the next request may go on this connection: h11 is ready for one and
        the server has not closed its side (noticed by the event loop meanwhile)."""
        return (
            self._h11.our_state is h11.IDLE
            and not self._reader.at_eof()
            and not self._writer.is_closing()
        )

    def close(self) -> None:
        """Close at once (no TLS close_notify wait; the server treats both alike)."""
        self._writer.close()

    async def aclose(self) -> None:
        """Close and wait a moment for the transport to finish."""
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            async with asyncio.timeout(1.0):
                await self._writer.wait_closed()

    async def request(
        self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> _Response:
        """Send one request and read its whole answer.

        Raises:
            _Stale: this connection was reused and found closed before any answer byte.
            _Oversize: the answer's body exceeds :data:`_MAX_BODY`.
            OSError (ConnectionError, ssl.SSLError), h11.ProtocolError: the exchange failed.
        """
        reused = self.used
        self.used = True
        try:
            return await self._request(method, target, headers, body, reused)
        except BaseException:
            self.close()
            raise

    async def _request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        reused: bool,
    ) -> _Response:
        conn = self._h11
        headers.append((b"content-length", str(len(body)).encode()))
        out = conn.send(h11.Request(method=method, target=target, headers=headers)) or b""
        if body:
            out += conn.send(h11.Data(data=body)) or b""
        self._writer.write(out + (conn.send(h11.EndOfMessage()) or b""))
        got_any = eof = False
        response: h11.Response | None = None
        chunks: list[bytes] = []
        size = 0
        try:
            await self._writer.drain()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    chunk = await self._reader.read(_READ_SIZE)
                    got_any = got_any or bool(chunk)
                    eof = not chunk
                    conn.receive_data(chunk)
                    continue
                if isinstance(event, h11.Response):
                    response = event
                    length = _content_length(event.headers)
                    if length is not None and length > _MAX_BODY:
                        raise _Oversize(length)
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > _MAX_BODY:
                        raise _Oversize(size)
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionResetError("the server closed the connection")
                # InformationalResponse (1xx): skipped; the final answer follows.
        except h11.RemoteProtocolError as exc:
            if not eof:
                raise  # malformed HTTP, not a closed connection
            where = "before answering" if response is None else "in the middle of the answer"
            if reused and not got_any:
                raise _Stale(f"closed {where}") from exc
            raise ConnectionResetError(f"the server closed the connection {where}") from exc
        except ConnectionError as exc:
            if reused and not got_any:
                raise _Stale(str(exc) or type(exc).__name__) from exc
            raise
        assert response is not None
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:  # Connection: close, or HTTP/1.0: this connection is done
            self.close()
        return _Response(response.status_code, list(response.headers), b"".join(chunks))


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for key, value in headers:
        if key == b"content-length":
            return int(value)
    return None


class _Lane:
    """One Digest client, its nonce state and its connection; used by one request at a
    time."""

    def __init__(self, digest: DigestClient | None) -> None:
        self.digest = digest
        #: A 401's challenges, to answer with the next request (then cleared).
        self.challenges: list[str] | None = None
        #: Whether ``digest`` holds a nonce the server gave us.
        self.have_nonce = False
        #: This lane's keep-alive connection, once opened.
        self.connection: _Connection | None = None

    def authorization(self, *, uri: str, rng: Random) -> str | None:
        """The Authorization header for the next request on this lane, if we can make one."""
        assert self.digest is not None
        if self.challenges is not None:
            header = self.digest.authorization(
                challenges=self.challenges, method="POST", uri=uri, rng=rng
            )
            self.challenges = None
            self.have_nonce = True
            return header
        if self.have_nonce:
            return self.digest.authorization(method="POST", uri=uri, rng=rng)
        return None


class ServerClient:
    """Async HTTPS client of one CPNS Server, authenticated as one entity.

    Params:
        server_url: ``https://host:port`` (a path prefix is kept).
        ca_file: the certificate the server presents (self-signed) or its CA.
        entity_id: Digest username (the gateway's Entity ID).
        eukey: Digest secret (the gateway's EUKey); None before enrolment, which only
            allows :class:`UserKeyAssignmentRequest`.
        per_try_timeout: seconds for one HTTP try (connect, write, read).
        retries: extra tries after a connection error, timeout or 5xx.
        backoff: seconds before the first retry, doubled for each next one.
        rng: source of the Digest cnonce.
        lanes: most exchanges in flight at once (each with its own Digest nonce and
            keep-alive connection).
    """

    def __init__(
        self,
        *,
        server_url: str,
        ca_file: Path | str | None,
        entity_id: str,
        eukey: bytes | None,
        per_try_timeout: float = 5.0,
        retries: int = 2,
        backoff: float = 0.2,
        rng: Random | None = None,
        lanes: int = 8,
    ) -> None:
        if retries < 0 or per_try_timeout <= 0 or backoff < 0 or not 1 <= lanes <= 64:
            raise ValueError("retries >= 0, per_try_timeout > 0, backoff >= 0 and lanes in 1..64")
        self._base = server_url.rstrip("/")
        parts = urlsplit(self._base)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"server_url must be https://host[:port], not {server_url!r}")
        if ca_file is None:
            raise ValueError("ca_file is required for HTTPS")
        self._host = parts.hostname
        try:
            self._port = parts.port or 443
        except ValueError:
            raise ValueError(f"bad port in server_url {server_url!r}") from None
        self._uri = (parts.path or "") + MESSAGES_PATH
        self._target = self._uri.encode("ascii")
        self._headers: Final = [
            (b"host", parts.netloc.rsplit("@", 1)[-1].encode("ascii")),
            (b"user-agent", _USER_AGENT.encode()),
            (b"content-type", _CBOR.encode()),
            (b"accept", _CBOR.encode()),
        ]
        self._tls = tls_context(ca_file)
        self._timeout = per_try_timeout
        self._entity_id = entity_id
        self._enrolled = eukey is not None
        self._all_lanes = [
            _Lane(DigestClient(entity_id, eukey.hex()) if eukey is not None else None)
            for _ in range(lanes)
        ]
        self._lanes: asyncio.LifoQueue[_Lane] = asyncio.LifoQueue()
        for lane in self._all_lanes:
            self._lanes.put_nowait(lane)
        self._retries = retries
        self._backoff = backoff
        self._rng: Random = rng if rng is not None else SystemRandom()

    def __repr__(self) -> str:
        return f"ServerClient({self._base!r}, entity_id={self._entity_id!r})"

    async def __aenter__(self) -> ServerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the keep-alive connection(s)."""
        for lane in self._all_lanes:
            if lane.connection is not None:
                connection, lane.connection = lane.connection, None
                await connection.aclose()

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.open_connection(
            self._host,
            self._port,
            ssl=self._tls,
            server_hostname=self._host,
            limit=_READ_SIZE,
        )
        return _Connection(reader, writer)

    async def healthz(self) -> bool:
        """``GET /healthz``: whether the server answers 200 (no authentication)."""
        target = (urlsplit(self._base).path + "/healthz").encode("ascii")
        try:
            async with asyncio.timeout(self._timeout):
                connection = await self._connect()
                try:
                    headers = [*self._headers[:2], (b"connection", b"close")]
                    response = await connection.request(b"GET", target, headers, b"")
                finally:
                    await connection.aclose()
        except (OSError, TimeoutError, h11.ProtocolError, _Oversize, _Stale):
            return False
        return response.status == 200

    async def exchange(self, message: Message) -> Message:
        """POST ``message`` and return the server's reply message.

        A 200 carries the protocol answer (its status inside, relayed unchanged); a 400
        carries an :class:`ErrorMessage`, which is returned too, so the caller sees the
        server's verdict either way.

        Raises:
            TransportError: the server is unreachable after the retries, answered an
                unexpected HTTP status, or sent a body that is not one CPNS message.
            UpstreamAuthFailed: Digest failed (our key refused, or the server's rspauth
                missing or wrong).

        The message carries the current flow ID (:func:`cpns.flow.stamp`) unless it has
        one; one log line each records it sent and the reply received.
        """
        message = stamp(message)
        body = encode(message)
        # Once enrolled, every request is authenticated, the with-UI one too: that is a
        # PNE's enrolment relayed from the PAN, and the server must know which PN GW
        # relayed it (docs/procedures/pne-enrolment.md).
        needs_auth = self._enrolled or not isinstance(message, UserKeyAssignmentRequest)
        if needs_auth and not self._enrolled:
            raise UpstreamAuthFailed("no EUKey: enrol the gateway first", hop="gateway")
        # The most recently used lane first (LIFO): it most likely holds a live nonce.
        lane = await self._lanes.get()
        kind = message.TYPE.name
        outcome = "error"
        started = time.perf_counter()
        log_hop(log, "sent", message, "server")
        try:
            reply = await self._exchange_on(lane, body, needs_auth, message)
            outcome = "answered"
        except TransportError:
            outcome = "unavailable"
            raise
        except AuthenticationFailed:
            outcome = "auth_failed"
            raise
        finally:
            self._lanes.put_nowait(lane)
            _duration_metric(kind).observe(time.perf_counter() - started)
            _exchange_metric(kind, outcome).inc()
        log_hop(log, "received", reply, "server")
        return reply

    async def _exchange_on(
        self, lane: _Lane, body: bytes, needs_auth: bool, message: Message
    ) -> Message:
        if needs_auth and isinstance(message, UserKeyAssignmentRequest):
            await self._prime(lane)
        for attempt in range(2):
            response, authenticated = await self._post(lane, body, needs_auth)
            if response.status != 401 or not needs_auth:
                return self._reply(lane, response, authenticated, message)
            challenges = response.header_list(b"www-authenticate")
            if not challenges:
                raise TransportError(f"{HOP}: 401 without a Digest challenge")
            if attempt == 1:
                break
            # First 401 (no nonce yet) or the nonce went stale: answer the challenge.
            lane.challenges = challenges
            log.debug("Digest challenge received (txid %s)", message.txid.hex())
        lane.have_nonce = False
        lane.challenges = None
        raise UpstreamAuthFailed("the server refused our Digest credentials", hop="server")

    async def _prime(self, lane: _Lane) -> None:
        """Make sure the lane can authenticate its next request.

        The server serves an open type (the with-UI request) sent without credentials
        at once, as a direct enrolment, instead of challenging it; a request we relay must
        carry Digest, so a lane without a nonce first fetches a challenge with an empty
        POST (the server answers it 401, like curl's first leg)."""
        if lane.have_nonce or lane.challenges is not None:
            return
        response, _ = await self._post(lane, b"", False)
        challenges = response.header_list(b"www-authenticate")
        if response.status != 401 or not challenges:
            raise TransportError(f"{HOP}: HTTP {response.status} to a Digest challenge request")
        lane.challenges = challenges

    async def _post(self, lane: _Lane, body: bytes, needs_auth: bool) -> tuple[_Response, bool]:
        """One logical POST with bounded retries; returns the response and whether it
        carried credentials."""
        delay = self._backoff
        last = "no attempt"
        for attempt in range(self._retries + 1):
            if attempt:
                metrics.GATEWAY_UPSTREAM_RETRIES.inc()
                await asyncio.sleep(delay)
                delay *= 2
            try:
                async with asyncio.timeout(self._timeout):
                    try:
                        response, authenticated = await self._try(lane, body, needs_auth)
                    except _Stale as exc:
                        # The server closed the idle connection: not a failure of the
                        # server, so straight to a new connection without a retry.
                        log.debug("keep-alive connection closed by the server (%s)", exc)
                        response, authenticated = await self._try(lane, body, needs_auth)
            except TimeoutError:
                last = "timed out"
            except _Oversize as exc:
                raise TransportError(
                    f"{HOP}: reply of {exc.args[0]} bytes or more exceeds the "
                    f"{_MAX_BODY}-byte limit"
                ) from None
            except (OSError, h11.ProtocolError, _Stale) as exc:
                last = _describe(exc)
            else:
                if response.status not in _RETRYABLE_STATUS:
                    return response, authenticated
                last = f"HTTP {response.status}"
            log.info("server unreachable (%s), try %d of %d", last, attempt + 1, self._retries + 1)
        raise TransportError(f"{HOP}: CPNS Server unreachable at {self._base} ({last})")

    async def _try(self, lane: _Lane, body: bytes, needs_auth: bool) -> tuple[_Response, bool]:
        """One HTTP request on the lane's connection (opened or reopened as needed)."""
        headers = list(self._headers)
        authenticated = False
        if needs_auth:
            # A fresh Authorization per try: each try is a new request with its own nc.
            try:
                header = lane.authorization(uri=self._uri, rng=self._rng)
            except AuthenticationFailed as exc:
                raise UpstreamAuthFailed(
                    f"unusable Digest challenge: {exc}", hop="gateway"
                ) from None
            if header is not None:
                headers.append((b"authorization", header.encode("ascii")))
                authenticated = True
        connection = lane.connection
        if connection is None or not connection.reusable:
            if connection is not None:
                connection.close()
            lane.connection = None
            connection = lane.connection = await self._connect()
        try:
            response = await connection.request(b"POST", self._target, headers, body)
        except BaseException:
            lane.connection = None  # closed by request()
            raise
        return response, authenticated

    def _reply(
        self, lane: _Lane, response: _Response, authenticated: bool, sent: Message
    ) -> Message:
        status = response.status
        if status == 200:
            if authenticated:
                assert lane.digest is not None
                info = response.header(b"authentication-info")
                if info is None:
                    raise UpstreamAuthFailed("reply without Authentication-Info", hop="gateway")
                try:
                    lane.digest.verify_response(info)
                except AuthenticationFailed as exc:
                    raise UpstreamAuthFailed(
                        f"server not authenticated: {exc.reason}", hop="gateway"
                    ) from None
            return self._decode(response.content, sent)
        if status == 400:
            reply = self._decode(response.content, sent)
            if not isinstance(reply, ErrorMessage):
                raise TransportError(f"{HOP}: HTTP 400 with a {reply.TYPE.name}")
            return reply
        raise TransportError(f"{HOP}: unexpected HTTP {status} from the CPNS Server")

    @staticmethod
    def _decode(content: bytes, sent: Message) -> Message:
        try:
            return decode(content)
        except DecodeError as exc:
            raise TransportError(
                f"{HOP}: reply to txid {sent.txid.hex()} is not a CPNS message ({exc.reason})"
            ) from None


@functools.cache
def _duration_metric(kind: str) -> Histogram:
    """The upstream duration histogram of one message type (labels looked up once)."""
    return metrics.GATEWAY_UPSTREAM_DURATION.labels(kind)


@functools.cache
def _exchange_metric(kind: str, outcome: str) -> Counter:
    """The upstream exchange counter of one message type and outcome (looked up once)."""
    return metrics.GATEWAY_UPSTREAM_EXCHANGES.labels(kind, outcome)


def _describe(exc: BaseException) -> str:
    """A short, secret-free description of a failed try for logs and TransportError."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, _Stale):
        return f"connection closed by the server: {exc}"
    if isinstance(exc, h11.ProtocolError):
        return f"malformed HTTP from the server: {exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionError):
        return f"connection lost: {exc}"
    return f"{type(exc).__name__}: {exc}"
