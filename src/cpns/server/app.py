"""The protocol endpoint: a bare ASGI application (DESIGN §8: the endpoint stays thin).

Routes:

``POST /cpns/v1/messages``
    One CPNS message (deterministic CBOR) in, one out. Messages other than the
    with-UI assignment request need HTTP Digest authentication keyed by the sender's
    EUKey (004 §5.x.2); the server proves itself back with ``rspauth`` in
    ``Authentication-Info``. 200 carries the protocol answer (its status inside), 400 an
    ErrorMessage for undecodable bytes, 401 a Digest challenge, 413 an oversize body.

    The 400's ErrorMessage carries the decoder's specific status (``MALFORMED_MESSAGE``
    100, ``UNSUPPORTED_VERSION`` 101), echoes the request's txid and is addressed to its
    source when those two header fields can still be read (else a zero txid and
    ``unknown``); a ``CPNS-Reason`` header gives the decoder's short reason (printable
    ASCII, at most ~150 characters), for people, not for programs.
``GET /cpns/v1/whoami``
    Digest-protected; answers the authenticated Entity ID as JSON. Lets an operator
    check a key with curl.
``GET /healthz``
    Liveness, no authentication.

When the server challenges (``POST /cpns/v1/messages``)
-------------------------------------------------------
The challenge comes before the body is decoded, so that a standard Digest client (curl
``--digest``, which sends its first POST with an empty body) gets its 401 and not a 400.
In this order, first match wins:

1. An ``Authorization`` header is present: it is verified from the request line and the
   header alone, before the body is read. Wrong, malformed, unknown entity, replayed
   ``nc``: 401 with a fresh challenge. Right but the nonce expired: 401 with
   ``stale=true``. Right: the body is read and decoded; undecodable is 400 (with
   ``Authentication-Info``), any message is served, the sender being the authenticated
   entity (for an open type, the message's own proof decides, and the authenticated
   entity is the PN GW that relayed it: a PNE's enrolment relayed over the PAN).
2. No ``Authorization`` header and an empty body: 401 challenge.
3. No ``Authorization`` header, a body that does not decode: 400 ErrorMessage (a
   challenge cannot help a client whose bytes are not a CPNS message).
4. No ``Authorization`` header, the body decodes to an *open* type (only
   ``UserKeyAssignmentRequest``, whose password proof is inside the message): served.
5. No ``Authorization`` header, any other type: 401 challenge; the message is not acted on.

A body over 64 KiB is 413 whatever the credentials (once they verified, if present).
Each 401 carries one ``WWW-Authenticate`` challenge per configured algorithm, all with
the same fresh nonce.

Only bytes and headers are handled here; the procedures run in
:class:`~cpns.server.service.CPNSService`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from cpns import metrics
from cpns.errors import AuthenticationFailed, StoreError
from cpns.logs import LogBudget, peer_text
from cpns.messages.constants import MAX_MESSAGE_SIZE
from cpns.protocol.digest import DigestServer, DigestStale, advance_nc
from cpns.server.service import CPNSService, Reply
from cpns.store.base import ServerStore
from cpns.types import Random

__all__ = ["CPNSApp"]

log = logging.getLogger("cpns.server.http")

type Scope = MutableMapping[str, Any]
type ASGIReceive = Callable[[], Awaitable[MutableMapping[str, Any]]]
type ASGISend = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_CBOR = b"application/cbor"
#: Route label of ``cpns_server_http_responses``: the known paths, "other" for the rest.
_ROUTES = {"/cpns/v1/messages": "messages", "/cpns/v1/whoami": "whoami", "/healthz": "healthz"}
#: Stands in for the EUKey of an entity that may not log in (same length, same work).
_NO_KEY = bytes(32)


class CPNSApp:
    """ASGI callable serving the CPNS protocol endpoint.

    ``offload_reads``: run the store reads of a request (the Digest secret lookup) in a
    worker thread, for a store whose reads are network round trips (PostgreSQL), so that
    they never block the event loop; SQLite reads are cheaper than the hand-off.

    With a ``digest`` whose ``nc_in_memory`` is False, each accepted (nonce, nc) is
    recorded in the store by compare and set before the request is served, so any server
    process over the same database refuses a replay that another one accepted
    (:func:`cpns.protocol.digest.advance_nc`, ``ServerStore.record_digest_nc``). That
    write is committed but not flushed to disk: see "What state lives where" in
    docs/deployment.md.
    """

    def __init__(
        self,
        *,
        service: CPNSService,
        store: ServerStore,
        digest: DigestServer,
        rng: Random,
        clock: Callable[[], int],
        offload_reads: bool = False,
    ) -> None:
        self._service = service
        self._store = store
        self._digest = digest
        self._rng = rng
        self._clock = clock
        self._store_log = LogBudget()
        self._offload_reads = offload_reads

    async def __call__(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # pragma: no cover - websockets are not routed here
            return
        started = False
        route = _ROUTES.get(scope.get("path", ""), "other")

        async def tracked_send(event: MutableMapping[str, Any]) -> None:
            nonlocal started
            if event["type"] == "http.response.start":
                metrics.SERVER_HTTP_RESPONSES.labels(route, str(event["status"])).inc()
            started = True
            await send(event)

        try:
            await self._route(scope, receive, tracked_send)
        except _Disconnected:
            return  # nobody to answer, nothing acted on
        except StoreError as exc:
            # The database cannot be read or written (restarted, failing over, disk
            # full): nothing was answered from half-stored facts; refuse cleanly with 503
            # and Retry-After, and the client retries (issue 7 item 7). An outage under
            # load must not write one line per request: the lines are budgeted.
            allowed, dropped = self._store_log.take(time.monotonic())
            if allowed:
                log.warning(
                    "store unavailable, answered 503%s: %s",
                    f" ({dropped} more since the last line)" if dropped else "",
                    peer_text(str(exc)),
                )
            if not started:
                await _respond(
                    send, 503, b"store unavailable\n", b"text/plain", [(b"retry-after", b"1")]
                )
        except Exception as exc:
            # A bug of ours on some input must cost that one request, never the process,
            # and must not print a traceback carrying the peer's bytes (issue 5 item 10):
            # one bounded line, and a clean 500 if nothing was sent yet.
            log.error(
                "internal error answering %s %s: %s: %s",
                peer_text(scope.get("method", "?"), 16),
                peer_text(scope.get("path", "?"), 64),
                type(exc).__name__,
                peer_text(str(exc)),
            )
            if not started:
                await _respond(send, 500, b"internal error\n", b"text/plain")

    async def _route(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        path, method = scope["path"], scope["method"]
        if path == "/healthz" and method in ("GET", "HEAD"):
            await _respond(send, 200, b"ok\n", b"text/plain")
        elif path == "/cpns/v1/messages":
            if method != "POST":
                await _respond(send, 405, b"use POST\n", b"text/plain", [(b"allow", b"POST")])
            else:
                await self._messages(scope, receive, send)
        elif path == "/cpns/v1/whoami":
            await self._whoami(scope, send)
        else:
            await _respond(send, 404, b"not found\n", b"text/plain")

    async def _lifespan(self, receive: ASGIReceive, send: ASGISend) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _authenticate(
        self, scope: Scope
    ) -> tuple[str | None, list[tuple[bytes, bytes]], bool]:
        """Verify Digest: (entity, extra response headers, stale) - entity None on failure."""
        header = _header(scope, b"authorization")
        if header is None:
            return None, [], False
        uri = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            uri += "?" + scope["query_string"].decode("latin-1")
        now = self._clock()
        try:
            attempt = self._digest.check(
                method=scope["method"], uri=uri, authorization=header, now=now
            )
            if self._offload_reads:
                secret = await asyncio.to_thread(self._lookup_secret, attempt.username)
            else:
                secret = self._lookup_secret(attempt.username)
            ok = self._digest.finish(attempt, password=secret, now=now)
            if not self._digest.nc_in_memory:
                await self._store.record_digest_nc(
                    ok.nonce,
                    keep_until=ok.replay_until,
                    advance=functools.partial(advance_nc, nc=ok.nc, window=self._digest.nc_window),
                )
        except DigestStale:
            metrics.SERVER_DIGEST_FAILURES.labels("stale_nonce").inc()
            return None, [], True
        except AuthenticationFailed as exc:
            metrics.SERVER_DIGEST_FAILURES.labels(digest_failure_class(exc)).inc()
            log.info("Digest authentication failed: %s", peer_text(exc.reason))
            return None, [], False
        return ok.username, [(b"authentication-info", ok.authentication_info.encode())], False

    def _lookup_secret(self, username: str) -> str | None:
        """Digest password of an entity: its EUKey in hex (004 §5.x.2), if it may log in.

        One path whatever the answer (issue 5 item 7): the store opens a sealed key for an
        unknown Entity ID too, the hex encoding is done either way, and the verifier then
        hashes a dummy password, so a 401 costs the same for a known, a revoked and an
        unknown Entity ID.
        """
        entity = self._store.get_entity(username)
        key = entity.eukey if entity is not None and not entity.revoked else None
        secret = (key if key is not None else _NO_KEY).hex()
        return secret if key is not None else None

    async def _challenge(self, send: ASGISend, stale: bool) -> None:
        values = self._digest.challenge(now=self._clock(), rng=self._rng, stale=stale)
        headers = [(b"www-authenticate", v.encode()) for v in values]
        await _respond(send, 401, b"Digest authentication required\n", b"text/plain", headers)

    async def _whoami(self, scope: Scope, send: ASGISend) -> None:
        entity, headers, stale = await self._authenticate(scope)
        if entity is None:
            await self._challenge(send, stale)
            return
        body = json.dumps({"entity_id": entity}).encode() + b"\n"
        await _respond(send, 200, body, b"application/json", headers)

    async def _messages(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        """``POST /cpns/v1/messages``: the challenge comes before the body is decoded.

        See "When the server challenges" in the module docstring for the rule.
        """
        entity: str | None = None
        headers: list[tuple[bytes, bytes]] = []
        credentials = _header(scope, b"authorization") is not None
        if credentials:
            # Verified from the request line and header alone: a wrong or stale
            # Authorization is answered before a byte of the body is read.
            entity, headers, stale = await self._authenticate(scope)
            if entity is None:
                await self._challenge(send, stale)
                return
        body = await _read_body(receive, MAX_MESSAGE_SIZE)
        if body is None:
            await _respond(send, 413, b"message too large\n", b"text/plain")
            return
        if not credentials and not body:
            # The first leg of a standard Digest client (curl --digest sends its POST with
            # an empty body until it holds a challenge).
            await self._challenge(send, False)
            return
        parsed = self._service.parse(body)
        if isinstance(parsed, Reply):
            reason = [(b"cpns-reason", peer_text(parsed.reason).encode())] if parsed.reason else []
            await _respond(send, parsed.http_status, parsed.body, _CBOR, [*headers, *reason])
            return
        if entity is None and self._service.requires_authentication(parsed):
            await self._challenge(send, False)
            return
        client = scope.get("client")
        reply = await self._service.handle(
            parsed, authenticated=entity, source=client[0] if client else None, encoded=body
        )
        await _respond(send, reply.http_status, reply.body, _CBOR, headers)


#: Reason classes of ``cpns_server_digest_failures`` by the start of the verifier's reason
#: (cpns.protocol.digest); anything else is "bad_parameters".
_DIGEST_REASONS: tuple[tuple[str, str], ...] = (
    ("malformed", "malformed"),
    ("wrong Digest response", "wrong_response"),
    # Not told apart from a wrong response in the metric either (same class, same code).
    ("unknown username", "wrong_response"),
    ("replayed nc", "replayed_nc"),
    ("nonce is not one of ours", "foreign_nonce"),
    ("unknown algorithm", "unsupported"),
    ("algorithm ", "unsupported"),
    ("userhash", "unsupported"),
    ("only qop", "unsupported"),
)


def digest_failure_class(exc: AuthenticationFailed) -> str:
    """The bounded reason class of a failed Digest verification (a metric label):
    ``stale_nonce`` (DigestStale), ``malformed``, ``wrong_response`` (wrong key or unknown
    Entity ID: one class), ``replayed_nc``, ``foreign_nonce``, ``unsupported``, or
    ``bad_parameters``."""
    if isinstance(exc, DigestStale):
        return "stale_nonce"
    for prefix, name in _DIGEST_REASONS:
        if exc.reason.startswith(prefix):
            return name
    return "bad_parameters"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class _Disconnected(Exception):
    """The client went away (or was cut by the listener) before its body was complete."""


async def _read_body(receive: ASGIReceive, limit: int) -> bytes | None:
    """The whole request body, or None once it exceeds ``limit`` bytes.

    Raises: _Disconnected: the connection ended first; a partial body is never acted on.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            raise _Disconnected
        chunk = event.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not event.get("more_body", False):
            return b"".join(chunks)


async def _respond(
    send: ASGISend,
    status: int,
    body: bytes,
    content_type: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
