"""The PN GW's relay of a PNE's EUKey assignment with UI (004 §5.x.1 through the PAN).

A PNE with UI asks its user for the User ID and password and builds a
:class:`UserKeyAssignmentRequest` (``entity_kind`` PNE) itself, with the same client
machine a PN GW uses for its own enrolment. It has no WAN access, so the request comes
over the PAN; :class:`PNEEnrolmentCoordinator` relays it, unchanged, to the server over
the gateway's HTTPS + Digest link (the server learns which PN GW relayed it and audits
it), and relays the server's answer, unchanged, back on the PAN link it came from.

The gateway is a relay, not a party to the key: the EUKey travels sealed under a key
derived from the user's password key and both rands, and the gateway never sees the
password or the password key, so it cannot open it. It stores nothing either: a lost
reply is recovered by the PNE sending the *same* request again (same txid, same bytes),
which the server answers from the reply it stored for that transaction.

Step by step (docs/procedures/pne-enrolment.md):

1. the PNE attached with :class:`PNEHello`; on that link it sends the request. The
   gateway checks what it can without a key: the request names the link's PNE
   (``src``; else the link ends, ``NOT_AUTHORIZED``), is a PNE's (``entity_kind``; else
   ``WRONG_ENTITY_KIND``) and is for our server (``dst``; else ``WRONG_DESTINATION``);
2. it sends the request upstream (one relay per PNE at a time: a retry waits for the
   first one and is then answered from the server's stored reply);
3. it sends back whatever the server answered: a :class:`UserKeyAssignmentResponse`
   (OK with the sealed EUKey, or the server's refusal) or the server's
   :class:`ErrorMessage`, both with ``src`` = the server;
4. if the server cannot be reached or Digest fails on the upstream link, the gateway
   answers with its own :class:`ErrorMessage` (``src`` = the gateway):
   ``UPSTREAM_UNAVAILABLE`` or ``AUTHENTICATION_FAILED``.

Failures name the hop by the sender of the refusal: the server's verdicts come from the
server, the gateway's own from the gateway. Logs carry the Entity IDs, the User ID, the
txid and the status, never ``auth_data``, the sealed EUKey or any key.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from cpns import metrics
from cpns.errors import AuthenticationFailed, ErrorCode, TransportError
from cpns.flow import log_hop
from cpns.gateway.procedures import PAN, Link
from cpns.gateway.procedures.enrolment import code_name
from cpns.gateway.upstream import HOP as UPSTREAM_HOP
from cpns.gateway.upstream import Upstream, UpstreamAuthFailed
from cpns.messages.model import (
    ErrorMessage,
    Message,
    UserKeyAssignmentRequest,
    UserKeyAssignmentResponse,
)
from cpns.types import EntityKind

__all__ = ["PNEEnrolmentCoordinator", "RelayOutcome"]

log = logging.getLogger("cpns.gateway")


@dataclass(frozen=True, slots=True)
class RelayOutcome:
    """What one relayed request ended in (for logs, metrics and tests)."""

    #: The status the PNE was sent (the server's, or the gateway's own).
    status: str
    #: Who decided it: "server", "gateway" or "gateway->server".
    hop: str
    #: Whether the answer reached the PAN link (False: the PNE retries, same txid).
    delivered: bool


class PNEEnrolmentCoordinator:
    """Relays PNEs' with-UI enrolment requests from the PAN to the server and back.

    Built before the daemon starts; :meth:`bind` gives it the server link once the store
    is read (the link authenticates as this gateway).
    """

    def __init__(self, *, gateway_id: str, server_id: str, pan: PAN) -> None:
        self._gateway_id = gateway_id
        self._server_id = server_id
        self._pan = pan
        self._upstream: Upstream | None = None
        #: PNE ID -> the lock its relays take (one upstream exchange per PNE at a time) and
        #: how many relays hold or wait for it (the entry goes when none does).
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __repr__(self) -> str:
        return f"<PNEEnrolmentCoordinator {self._gateway_id}>"

    def bind(self, upstream: Upstream) -> None:
        """The server link (HTTPS + Digest as this gateway)."""
        self._upstream = upstream

    async def on_request(self, link: Link, message: Message) -> bool:
        """A :class:`UserKeyAssignmentRequest` from an attached link; False closes it."""
        assert isinstance(message, UserKeyAssignmentRequest)
        pne_id = link.pne_id
        assert pne_id is not None
        if message.src != pne_id:
            # Another PNE's request on this link: a PAN peer's fault; this link ends.
            log_hop(log, "received", message, "pne", level=logging.DEBUG)
            self._pan.peer_fault(link, "enrolment request for another PNE", message.src)
            await self._pan.refuse(link, ErrorCode.NOT_AUTHORIZED, message.txid)
            return False
        log_hop(log, "received", message, "pne")
        refusal = self._check(message)
        if refusal is not None:
            log.info(
                "PNE %s: enrolment request (txid %s) refused at gateway: %s",
                pne_id,
                message.txid.hex(),
                refusal.name,
            )
            await self._answer(link, self._error(message, refusal), "gateway")
            return True
        lock, users = self._locks.get(pne_id, (asyncio.Lock(), 0))
        self._locks[pne_id] = (lock, users + 1)
        try:
            async with lock:
                await self.relay(link, message)
        finally:
            _, users = self._locks[pne_id]
            if users == 1:
                del self._locks[pne_id]
            else:
                self._locks[pne_id] = (lock, users - 1)
        return True

    def _check(self, message: UserKeyAssignmentRequest) -> ErrorCode | None:
        """What the gateway can refuse without a key (None: relay it)."""
        if message.entity_kind is not EntityKind.PNE:
            return ErrorCode.WRONG_ENTITY_KIND  # a PN GW enrols over its own HTTPS link
        if message.dst != self._server_id:
            return ErrorCode.WRONG_DESTINATION
        return None

    def _error(self, request: Message, code: ErrorCode) -> ErrorMessage:
        """The gateway's own refusal of ``request`` (``src`` names the gateway's hop)."""
        return ErrorMessage(
            txid=request.txid, src=self._gateway_id, dst=request.src, flow=request.flow, status=code
        )

    async def relay(self, link: Link, request: UserKeyAssignmentRequest) -> RelayOutcome:
        """Send ``request`` upstream unchanged and its answer back on ``link``."""
        assert self._upstream is not None, "bind() first"
        txid = request.txid.hex()
        log.info(
            "relaying enrolment of PNE %s for user %s to the server (txid %s)",
            request.src,
            request.user_id,
            txid,
        )
        try:
            reply = await self._upstream.exchange(request)
        except TransportError as exc:
            log.warning("txid %s for PNE %s: %s", txid, request.src, exc)
            return await self._answer(
                link, self._error(request, ErrorCode.UPSTREAM_UNAVAILABLE), UPSTREAM_HOP
            )
        except AuthenticationFailed as exc:
            hop = exc.hop if isinstance(exc, UpstreamAuthFailed) else "server"
            log.warning("txid %s for PNE %s: Digest failed at %s: %s", txid, request.src, hop, exc)
            return await self._answer(
                link, self._error(request, ErrorCode.AUTHENTICATION_FAILED), UPSTREAM_HOP
            )
        if not isinstance(reply, UserKeyAssignmentResponse | ErrorMessage):
            log.warning(
                "txid %s for PNE %s: the server answered with a %s", txid, request.src, reply.TYPE
            )
            return await self._answer(
                link, self._error(request, ErrorCode.UNEXPECTED_MESSAGE), "gateway"
            )
        # The server's answer goes back as it came: the PNE's machine checks it (the
        # gateway could not: the EUKey is sealed under a key only the PNE can derive).
        return await self._answer(link, reply, "server")

    async def _answer(self, link: Link, reply: Message, hop: str) -> RelayOutcome:
        status = code_name(getattr(reply, "status", ErrorCode.OK))
        delivered = await link.send(reply)
        if delivered:
            log.info(
                "enrolment of PNE %s (txid %s): %s at %s relayed to the PNE",
                reply.dst,
                reply.txid.hex(),
                status,
                hop,
            )
        else:
            log.info(
                "enrolment of PNE %s (txid %s): %s at %s not delivered (link gone); "
                "the PNE retries with the same txid",
                reply.dst,
                reply.txid.hex(),
                status,
                hop,
            )
        metrics.GATEWAY_PNE_ENROLMENTS.labels(status, hop).inc()
        return RelayOutcome(status=status, hop=hop, delivered=delivered)
