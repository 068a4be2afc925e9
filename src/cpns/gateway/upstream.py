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
  authenticated). The with-UI enrolment request (:class:`UserKeyAssignmentRequest`) is
  the exception: we have no EUKey yet, and the proof travels inside the message.
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
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from pathlib import Path
from typing import Final, Protocol

import httpx

from cpns import metrics
from cpns.errors import AuthenticationFailed, ConfigurationError, DecodeError, TransportError
from cpns.flow import log_hop, stamp
from cpns.messages.codec import decode, encode
from cpns.messages.model import ErrorMessage, Message, UserKeyAssignmentRequest
from cpns.protocol.digest import DigestClient
from cpns.runtime import SystemRandom
from cpns.types import Random

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


class _Lane:
    """One Digest client and its nonce state; used by one request at a time."""

    def __init__(self, digest: DigestClient | None) -> None:
        self.digest = digest
        #: A 401's challenges, to answer with the next request (then cleared).
        self.challenges: list[str] | None = None
        #: Whether ``digest`` holds a nonce the server gave us.
        self.have_nonce = False

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
        lanes: most exchanges in flight at once (each with its own Digest nonce).
        transport: an httpx transport (tests: ``httpx.MockTransport``); default HTTPS.
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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if retries < 0 or per_try_timeout <= 0 or backoff < 0 or not 1 <= lanes <= 64:
            raise ValueError("retries >= 0, per_try_timeout > 0, backoff >= 0 and lanes in 1..64")
        self._base = server_url.rstrip("/")
        self._url = self._base + MESSAGES_PATH
        self._uri = httpx.URL(self._url).raw_path.decode("ascii")
        self._entity_id = entity_id
        self._enrolled = eukey is not None
        self._lanes: asyncio.LifoQueue[_Lane] = asyncio.LifoQueue()
        for _ in range(lanes):
            self._lanes.put_nowait(
                _Lane(DigestClient(entity_id, eukey.hex()) if eukey is not None else None)
            )
        self._retries = retries
        self._backoff = backoff
        self._rng: Random = rng if rng is not None else SystemRandom()
        verify: ssl.SSLContext | bool = True
        if transport is None:
            if ca_file is None:
                raise ValueError("ca_file is required for HTTPS")
            verify = tls_context(ca_file)
        self._http = httpx.AsyncClient(
            verify=verify,
            transport=transport,
            timeout=httpx.Timeout(per_try_timeout),
            http1=True,
            http2=False,
            follow_redirects=False,
            headers={"content-type": _CBOR, "accept": _CBOR},
        )

    def __repr__(self) -> str:
        return f"ServerClient({self._base!r}, entity_id={self._entity_id!r})"

    async def __aenter__(self) -> ServerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the keep-alive connection(s)."""
        await self._http.aclose()

    async def healthz(self) -> bool:
        """``GET /healthz``: whether the server answers 200 (no authentication)."""
        try:
            response = await self._http.get(self._base + "/healthz")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

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
        needs_auth = not isinstance(message, UserKeyAssignmentRequest)
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
            metrics.GATEWAY_UPSTREAM_DURATION.labels(kind).observe(time.perf_counter() - started)
            metrics.GATEWAY_UPSTREAM_EXCHANGES.labels(kind, outcome).inc()
        log_hop(log, "received", reply, "server")
        return reply

    async def _exchange_on(
        self, lane: _Lane, body: bytes, needs_auth: bool, message: Message
    ) -> Message:
        for attempt in range(2):
            response, authenticated = await self._post(lane, body, needs_auth)
            if response.status_code != 401 or not needs_auth:
                return self._reply(lane, response, authenticated, message)
            challenges = response.headers.get_list("www-authenticate")
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

    async def _post(
        self, lane: _Lane, body: bytes, needs_auth: bool
    ) -> tuple[httpx.Response, bool]:
        """One logical POST with bounded retries; returns the response and whether it
        carried credentials."""
        delay = self._backoff
        last = "no attempt"
        for attempt in range(self._retries + 1):
            if attempt:
                metrics.GATEWAY_UPSTREAM_RETRIES.inc()
                await asyncio.sleep(delay)
                delay *= 2
            headers: dict[str, str] = {}
            if needs_auth:
                # A fresh Authorization per try: each try is a new request with its own nc.
                try:
                    header = lane.authorization(uri=self._uri, rng=self._rng)
                except AuthenticationFailed as exc:
                    raise UpstreamAuthFailed(
                        f"unusable Digest challenge: {exc}", hop="gateway"
                    ) from None
                if header is not None:
                    headers["authorization"] = header
            try:
                response = await self._http.post(self._url, content=body, headers=headers)
            except httpx.TimeoutException:
                last = "timed out"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code not in _RETRYABLE_STATUS:
                    return response, "authorization" in headers
                last = f"HTTP {response.status_code}"
            log.info("server unreachable (%s), try %d of %d", last, attempt + 1, self._retries + 1)
        raise TransportError(f"{HOP}: CPNS Server unreachable at {self._base} ({last})")

    def _reply(
        self, lane: _Lane, response: httpx.Response, authenticated: bool, sent: Message
    ) -> Message:
        status = response.status_code
        if status == 200:
            if authenticated:
                assert lane.digest is not None
                info = response.headers.get("authentication-info")
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
