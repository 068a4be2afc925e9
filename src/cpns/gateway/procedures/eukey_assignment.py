"""The PN GW role of the EUKey assignment for a PNE without UI (003 §7.4.2.1.1).

:class:`EUKeyAssignmentCoordinator` drives :class:`EUKeyAssignmentGateway` machines and
does what the procedure needs of the outside world through three interfaces: the server
link (:class:`~cpns.gateway.upstream.Upstream`), the PAN side
(:class:`~cpns.gateway.procedures.PAN`) and the PNE records
(:class:`~cpns.gateway.ledger.PNELedger`). Step by step, with what is persisted *before*
what depends on it:

1. ``assign``: :meth:`EUKeyAssignmentGateway.start` builds the request. Its encoding is
   stored (:class:`~cpns.gateway.records.PendingRequest`) **before** it is sent, so a
   restart resends the same bytes and the server, which keeps the reply of every
   transaction, answers with the same response.
2. The response is fed to the machine. On :class:`EUKeySetReceived` the TK with its
   ratchet step (a re-assignment after TK-based authentications carries the server's
   TK_t; the PNE's TK flow starts again from ``(TK_t, t)``), the set, the selected index
   and the txid are stored (:class:`~cpns.gateway.records.KeySet`,
   ``delivered=False``) **before** the Notification goes to the PNE (003 §7.4.2.1.1.3
   step 1 "SHALL store", then step 3).
3. The Notification is sent if the PNE is attached, else when it attaches; after a
   restart the machine is rebuilt with :meth:`EUKeyAssignmentGateway.resume`.
4. The PNE's acknowledgement (our D-003-4) is verified by the machine and
   ``delivered=True`` is stored. A duplicate or late Ack is harmless and ignored; an Ack
   that proves nothing (a refusal has no MAC) decides nothing (D-PAN-2).

A restart between any two steps therefore loses nothing: pending requests are resent at
start-up (and every ``retry_interval`` while the server is unreachable), pending
deliveries are offered again whenever the PNE (re)attaches.

Failures are typed and name the hop: the server's verdict is relayed unchanged with hop
``server``; an unreachable server is ``UPSTREAM_UNAVAILABLE`` at ``gateway->server``; a
wait that ends before the PNE proved receipt is ``TIMEOUT`` at ``device`` (a PNE's
refusal is unauthenticated: reported as ignored).

Flows (docs/logging.md): an ``assign`` for an attached PNE continues the flow of its
PNEHello (the PNE asked for a key), else the gateway starts one. The flow ID is stored
with the request and the key set, so a resend or a later delivery carries the same one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from cpns import metrics
from cpns.errors import (
    AuthenticationFailed,
    DecodeError,
    ErrorCode,
    StoreError,
    TransportError,
)
from cpns.flow import flow_bytes, flow_hex, log_hop, message_scope, new_flow, stamp
from cpns.gateway.ledger import PNELedger
from cpns.gateway.procedures import PAN, Link
from cpns.gateway.procedures.enrolment import code_name
from cpns.gateway.records import KeySet, PendingRequest
from cpns.gateway.upstream import HOP as UPSTREAM_HOP
from cpns.gateway.upstream import Upstream, UpstreamAuthFailed
from cpns.logs import current_flow, flow_scope
from cpns.messages.codec import decode, encode
from cpns.messages.constants import ID_PATTERN
from cpns.messages.model import (
    ErrorMessage,
    EUKeyAssignmentAck,
    EUKeyAssignmentRequest,
    EUKeyAssignmentResponse,
    Message,
)
from cpns.protocol._machine import Event, ProcedureFailed
from cpns.protocol.key_assignment import (
    EUKeyAssignmentGateway,
    EUKeyDelivered,
    EUKeySetReceived,
    GatewayState,
)
from cpns.types import Random

__all__ = ["AssignResult", "EUKeyAssignmentCoordinator"]

log = logging.getLogger("cpns.gateway")


@dataclass(frozen=True, slots=True)
class AssignResult:
    """Outcome of one ``assign``, as returned on the control socket."""

    #: Whether no party refused (the key may still await delivery: see ``stage``).
    ok: bool
    #: ErrorCode name: "OK", or the refusal (the server's verdict relayed unchanged).
    status: str
    #: Furthest step reached: "requested", "stored" (set stored) or "delivered" (acked).
    stage: str
    #: Who decided a failure: "server", "gateway", "gateway->server", "device"; None if ok.
    hop: str | None = None
    #: PNE Entity ID.
    pne_id: str = ""
    #: Transaction ID (hex): the correlation ID in every party's logs.
    txid: str = ""
    #: Acks for this delivery that proved nothing (refusals without a MAC, proofs that
    #: did not verify), ignored (D-PAN-2); reported with a TIMEOUT.
    unverified_acks: int = 0
    #: The status the last of those claimed (e.g. "AUTHENTICATION_FAILED"), or "".
    unverified_status: str = ""
    #: Flow ID (16 hex digits) of the assignment, for ``cpns trace``; "" if none.
    flow: str = ""

    def to_json(self) -> dict[str, object]:
        """The control-socket reply."""
        return {
            "ok": self.ok,
            "status": self.status,
            "stage": self.stage,
            "hop": self.hop,
            "pne_id": self.pne_id,
            "txid": self.txid,
            "unverified_acks": self.unverified_acks,
            "unverified_status": self.unverified_status,
            "flow": self.flow,
        }


class EUKeyAssignmentCoordinator:
    """The 003 PN GW role over every PNE: requests to the server, deliveries on the PAN.

    Built before the daemon starts; :meth:`bind` gives it the gateway's EUKey and the
    server link once the store is read.
    """

    def __init__(
        self,
        *,
        gateway_id: str,
        server_id: str,
        ledger: PNELedger,
        pan: PAN,
        rng: Random,
        clock: Callable[[], int],
        retry_interval: float,
    ) -> None:
        self._gateway_id = gateway_id
        self._server_id = server_id
        self._ledger = ledger
        self._pan = pan
        self._rng = rng
        self._clock = clock
        self._retry_interval = retry_interval
        self._eukey = b""
        self._upstream: Upstream | None = None
        #: PNE ID -> (txid, Acks for it that proved nothing, the status the last claimed):
        #: refusals without a MAC and proofs that did not verify, ignored but counted for
        #: the user (D-PAN-2).
        self._unverified: dict[str, tuple[bytes, int, str]] = {}
        #: PNE ID -> the live machine awaiting its Ack.
        self._deliveries: dict[str, EUKeyAssignmentGateway] = {}
        #: PNE ID -> callers of ``assign --wait`` waiting for a delivery of a txid.
        self._waiters: dict[str, list[tuple[bytes, asyncio.Future[AssignResult]]]] = {}

    def __repr__(self) -> str:
        return f"<EUKeyAssignmentCoordinator {self._gateway_id}>"

    def bind(self, eukey: bytes, upstream: Upstream) -> None:
        """The gateway's own EUKey (it authenticates the requests) and the server link."""
        self._eukey = eukey
        self._upstream = upstream

    def cancel_waiters(self) -> None:
        """The daemon stops: callers waiting for a delivery get the stage reached so far."""
        for waiters in self._waiters.values():
            for _, fut in waiters:
                fut.cancel()

    def _new_machine(self) -> EUKeyAssignmentGateway:
        return EUKeyAssignmentGateway(
            gateway_id=self._gateway_id,
            gateway_eukey=self._eukey,
            server_id=self._server_id,
            rng=self._rng,
        )

    # -- request / response -------------------------------------------------------------

    async def assign(
        self,
        pne_id: str,
        user_id: str,
        password_key: bytes,
        *,
        claim_key: bytes,
        wait: float = 0.0,
    ) -> AssignResult:
        """Run the 003 PN GW role for ``pne_id``; wait up to ``wait`` s for delivery.

        ``claim_key`` stands for the claim code the user read from the PNE's label
        (:func:`cpns.protocol.key_assignment.claim_key`, deviations D-003-10).

        Never raises for protocol, transport or store failures: they come back as a
        refused :class:`AssignResult` naming the status and the hop.

        The assignment continues the flow of the PNE's PNEHello when the PNE is attached
        (it asked for a key), else starts a new flow; the result names it.
        """
        flow = self._pan.hello_flow(pne_id)
        with flow_scope(flow or new_flow()):
            result = await self._assign(pne_id, user_id, password_key, claim_key, wait)
            return dataclasses.replace(result, flow=current_flow() or "")

    async def _assign(
        self, pne_id: str, user_id: str, password_key: bytes, claim_key: bytes, wait: float
    ) -> AssignResult:
        for value in (pne_id, user_id):
            if ID_PATTERN.fullmatch(value) is None:
                return AssignResult(
                    ok=False,
                    status="MALFORMED_MESSAGE",
                    stage="requested",
                    hop="gateway",
                    pne_id=pne_id,
                )
        if len(password_key) != 32 or len(claim_key) != 32:
            return AssignResult(
                ok=False,
                status="MALFORMED_MESSAGE",
                stage="requested",
                hop="gateway",
                pne_id=pne_id,
            )
        async with self._ledger.lock_for(pne_id):
            machine = self._new_machine()
            machine.start(
                pne_id=pne_id,
                user_id=user_id,
                password_key=password_key,
                claim_key=claim_key,
                now=self._clock(),
            )
            assert machine.request is not None
            request = stamp(machine.request)  # the stored bytes carry the flow ID
            record = self._ledger.get(pne_id)
            previous = record.request
            # Persist the request BEFORE sending it: a restart resends the same bytes.
            self._ledger.put(
                pne_id,
                dataclasses.replace(
                    record,
                    request=PendingRequest(
                        txid=request.txid,
                        encoded=encode(request),
                        user_id=user_id,
                        created_at=self._clock(),
                    ),
                ),
            )
            try:
                await self._ledger.save(pne_id)
            except StoreError as exc:
                self._ledger.put(
                    pne_id, dataclasses.replace(self._ledger.get(pne_id), request=previous)
                )
                log.error("cannot persist the request for %s: %s", pne_id, exc)
                return AssignResult(
                    ok=False,
                    status="INTERNAL_ERROR",
                    stage="requested",
                    hop="gateway",
                    pne_id=pne_id,
                    txid=request.txid.hex(),
                )
            log.info(
                "EUKey assignment for PNE %s (user %s) requested, txid %s",
                pne_id,
                user_id,
                request.txid.hex(),
            )
            waiter: asyncio.Future[AssignResult] | None = None
            if wait > 0:
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.setdefault(pne_id, []).append((request.txid, waiter))
            result = await self._complete_request(pne_id, machine)
        if waiter is None:
            return result
        try:
            if not result.ok or result.stage != "stored":
                return result
            await asyncio.wait({waiter}, timeout=wait)
            if waiter.done() and not waiter.cancelled():
                return waiter.result()
            if waiter.done():  # cancelled: the daemon stops; the stage reached so far
                return result
            return self._not_proven(result)
        finally:
            self._drop_waiter(pne_id, waiter)

    def _not_proven(self, stored: AssignResult) -> AssignResult:
        """D-PAN-2: ``--wait`` ran out before any PNE proved receipt with a MAC. The key is
        stored and offered again on every attach; what unauthenticated Acks claimed is
        reported as such, never as the outcome."""
        txid, count, claimed = self._unverified.get(stored.pne_id, (b"", 0, ""))
        if txid.hex() != stored.txid:
            count, claimed = 0, ""
        return dataclasses.replace(
            stored,
            ok=False,
            status="TIMEOUT",
            hop="device",
            unverified_acks=count,
            unverified_status=claimed,
        )

    def _drop_waiter(self, pne_id: str, waiter: asyncio.Future[AssignResult]) -> None:
        waiters = self._waiters.get(pne_id, [])
        self._waiters[pne_id] = [(t, f) for t, f in waiters if f is not waiter]
        if not self._waiters[pne_id]:
            del self._waiters[pne_id]
        if not waiter.done():
            waiter.cancel()

    def _resolve(self, pne_id: str, txid: bytes, result: AssignResult) -> None:
        for wanted, fut in self._waiters.get(pne_id, []):
            if wanted == txid and not fut.done():
                fut.set_result(result)

    async def _complete_request(self, pne_id: str, machine: EUKeyAssignmentGateway) -> AssignResult:
        """Send the machine's (persisted) request, feed the answer, store, notify; the
        outcome is counted in ``cpns_gateway_assignments``."""
        result = await self._exchange_request(pne_id, machine)
        metrics.GATEWAY_ASSIGNMENTS.labels(result.status, result.hop or "none").inc()
        return result

    async def _exchange_request(self, pne_id: str, machine: EUKeyAssignmentGateway) -> AssignResult:
        (request,) = machine.messages_to_send()
        assert isinstance(request, EUKeyAssignmentRequest)
        request = stamp(request)  # the same bytes as stored: the flow is the same
        txid = request.txid.hex()
        assert self._upstream is not None
        try:
            reply = await self._upstream.exchange(request)
        except TransportError as exc:
            # The request stays stored: it is resent at start-up and by the retry loop.
            log.warning("txid %s for PNE %s: %s", txid, pne_id, exc)
            return AssignResult(
                ok=False,
                status="UPSTREAM_UNAVAILABLE",
                stage="requested",
                hop=UPSTREAM_HOP,
                pne_id=pne_id,
                txid=txid,
            )
        except AuthenticationFailed as exc:
            hop = exc.hop if isinstance(exc, UpstreamAuthFailed) else "server"
            log.warning(
                "txid %s for PNE %s: Digest failed at %s: %s", txid, pne_id, hop, exc.reason
            )
            return await self._refused(pne_id, request, ErrorCode.AUTHENTICATION_FAILED, hop)
        events: list[Event]
        hop = "gateway"
        if isinstance(reply, ErrorMessage):
            events = machine.fail(reply.status, "server answered with an ErrorMessage")
            hop = "server"
        else:
            if isinstance(reply, EUKeyAssignmentResponse) and reply.status is not ErrorCode.OK:
                hop = "server"  # the server's verdict, relayed unchanged
            events = machine.receive(reply)
        for event in events:
            if isinstance(event, ProcedureFailed):
                log.warning(
                    "txid %s for PNE %s refused: %s at %s (%s)",
                    txid,
                    pne_id,
                    code_name(event.code),
                    hop,
                    event.reason,
                )
                return await self._refused(pne_id, request, event.code, hop)
            if isinstance(event, EUKeySetReceived):
                return await self._store_set(pne_id, request, event, machine)
        return await self._refused(pne_id, request, ErrorCode.INTERNAL_ERROR, "gateway")

    async def _refused(
        self, pne_id: str, request: EUKeyAssignmentRequest, code: ErrorCode | int, hop: str
    ) -> AssignResult:
        """A definitive refusal: forget the request (keep any earlier key set)."""
        record = self._ledger.get(pne_id)
        pending = record.request
        if pending is not None and pending.txid == request.txid:
            pending = None
        self._ledger.put(
            pne_id, dataclasses.replace(record, request=pending, last_status=code_name(code))
        )
        with contextlib.suppress(StoreError):
            await self._ledger.save(pne_id)  # if this fails the request is resent, refused again
        return AssignResult(
            ok=False,
            status=code_name(code),
            stage="requested",
            hop=hop,
            pne_id=pne_id,
            txid=request.txid.hex(),
        )

    async def _store_set(
        self,
        pne_id: str,
        request: EUKeyAssignmentRequest,
        event: EUKeySetReceived,
        machine: EUKeyAssignmentGateway,
    ) -> AssignResult:
        """003 §7.4.2.1.1.3 step 1: store TK and [EUKeyPNE] BEFORE notifying the PNE."""
        txid = request.txid.hex()
        before = self._ledger.get(pne_id)
        self._ledger.put(
            pne_id,
            dataclasses.replace(
                before,
                request=None,
                reassign=None,  # a new set answers a re-assignment queued by PN Establishment
                key_set=KeySet(
                    txid=request.txid,
                    user_id=event.user_id,
                    tk=event.tk,
                    eukeys=tuple(event.eukeys),
                    key_index=event.key_index,
                    epoch=event.epoch,
                    tk_step=event.tk_step,
                    delivered=False,
                    stored_at=self._clock(),
                    flow=flow_bytes(current_flow()),
                ),
                last_status="OK",
            ),
        )
        try:
            await self._ledger.save(pne_id)
        except StoreError as exc:
            self._ledger.put(pne_id, before)
            machine.messages_to_send()  # never send what is not stored
            log.error("txid %s: cannot store the key set of %s: %s", txid, pne_id, exc)
            return AssignResult(
                ok=False,
                status="INTERNAL_ERROR",
                stage="requested",
                hop="gateway",
                pne_id=pne_id,
                txid=txid,
            )
        log.info("txid %s: EUKey set for PNE %s stored (index %d)", txid, pne_id, event.key_index)
        self._deliveries[pne_id] = machine
        self._unverified.pop(pne_id, None)
        notification = machine.messages_to_send()
        # D-PAN-1: to every link announcing this PNE; it is sealed under the TK, so only
        # the real PNE can open it (and only its MAC-proved Ack counts).
        links = self._pan.links(pne_id)
        for link in links:
            for message in notification:
                if await link.send(message):
                    log.info("txid %s: Notification sent to PNE %s (%s)", txid, pne_id, link.peer)
        if not links:
            log.info("txid %s: PNE %s not attached; delivery pending", txid, pne_id)
        return AssignResult(ok=True, status="OK", stage="stored", pne_id=pne_id, txid=txid)

    async def retry_loop(self) -> None:
        """Resend stored requests now (start-up) and then every ``retry_interval``."""
        while True:
            for pne_id, record in list(self._ledger.records.items()):
                stored = record.request
                lock = self._ledger.lock_for(pne_id)
                if stored is None or lock.locked():
                    continue
                async with lock:
                    if self._ledger.get(pne_id).request is not stored:
                        continue
                    try:
                        request = decode(stored.encoded)
                        if not isinstance(request, EUKeyAssignmentRequest):
                            raise DecodeError("not an EUKeyAssignmentRequest")
                    except DecodeError:
                        log.error("stored request for %s is unreadable; dropped", pne_id)
                        self._ledger.put(
                            pne_id, dataclasses.replace(self._ledger.get(pne_id), request=None)
                        )
                        with contextlib.suppress(StoreError):
                            await self._ledger.save(pne_id)
                        continue
                    machine = self._new_machine()
                    machine.resend(request)
                    with message_scope(request):
                        log.info("resending txid %s for PNE %s", request.txid.hex(), pne_id)
                        try:
                            await self._complete_request(pne_id, machine)
                        except Exception:
                            log.exception("resend for %s failed", pne_id)
            await asyncio.sleep(self._retry_interval)

    # -- delivery on the PAN ------------------------------------------------------------

    def _delivery_machine(self, pne_id: str, key_set: KeySet) -> EUKeyAssignmentGateway:
        """The live machine awaiting this PNE's Ack, rebuilt from the store if needed."""
        machine = self._deliveries.get(pne_id)
        if machine is not None and machine.state is GatewayState.EXPECT_ACK:
            machine.renotify()
            return machine
        machine = self._new_machine()
        machine.resume(
            EUKeySetReceived(
                pne_id=pne_id,
                user_id=key_set.user_id,
                tk=key_set.tk,
                eukeys=key_set.eukeys,
                key_index=key_set.key_index,
                epoch=key_set.epoch,
                tk_step=key_set.tk_step,
            ),
            txid=key_set.txid,
        )
        self._deliveries[pne_id] = machine
        return machine

    async def offer_delivery(self, link: Link, pne_id: str) -> None:
        """A link announced ``pne_id``: send it the Notification of a pending key set."""
        key_set = self._ledger.get(pne_id).pending_set
        if key_set is None:
            return
        machine = self._delivery_machine(pne_id, key_set)
        # The delivery belongs to the assignment's flow, not to the hello's.
        with flow_scope(flow_hex(key_set.flow) or current_flow()):
            for message in machine.messages_to_send():
                if await link.send(message):
                    log.info("txid %s: Notification (re)sent to PNE %s", key_set.txid.hex(), pne_id)

    def _note_unverified(self, link: Link, ack: EUKeyAssignmentAck, why: str) -> None:
        """D-PAN-2: an Ack that proves nothing is logged (within the fault budget),
        counted for the waiting user, and otherwise ignored."""
        pne_id = link.pne_id
        assert pne_id is not None
        txid, count, _ = self._unverified.get(pne_id, (ack.txid, 0, ""))
        if txid == ack.txid:
            self._unverified[pne_id] = (txid, count + 1, ack.status.name)
        self._pan.peer_fault(link, f"Ack for txid {ack.txid.hex()} ignored: {why}")

    async def on_ack(self, link: Link, ack: Message) -> bool:
        """An Ack from an attached link; False closes the link.

        Only an Ack whose MAC verifies decides delivery (D-PAN-2). A refusal carries no
        MAC, so anyone on the PAN could have sent it: it is logged, counted and ignored,
        and the key stays pending (offered again on every attach)."""
        assert isinstance(ack, EUKeyAssignmentAck)
        pne_id = link.pne_id
        assert pne_id is not None
        key_set = self._ledger.get(pne_id).key_set
        acted_on = (
            ack.src == pne_id
            and key_set is not None
            and key_set.txid == ack.txid
            and not key_set.delivered
            and ack.status is ErrorCode.OK
            and ack.proof is not None
        )
        log_hop(log, "received", ack, "pne", level=logging.INFO if acted_on else logging.DEBUG)
        if ack.src != pne_id:
            self._pan.peer_fault(link, "Ack claims to come from another PNE", ack.src)
            await self._pan.refuse(link, ErrorCode.NOT_AUTHORIZED, ack.txid)
            return False
        if key_set is None or key_set.txid != ack.txid or key_set.delivered:
            # A duplicate or late Ack (a lost message retried) is harmless.
            if self._pan.log_allowed():
                log.info(
                    "PNE %s: Ack for txid %s ignored (nothing outstanding)",
                    pne_id,
                    ack.txid.hex(),
                )
            return True
        if ack.status is not ErrorCode.OK or ack.proof is None:
            self._note_unverified(link, ack, f"unauthenticated refusal {ack.status.name}")
            return True
        machine = self._deliveries.get(pne_id)
        if machine is None or machine.state is not GatewayState.EXPECT_ACK:
            machine = self._delivery_machine(pne_id, key_set)
            machine.messages_to_send()  # the Ack answers an earlier Notification
        txid = ack.txid.hex()
        for event in machine.receive(ack):
            if isinstance(event, EUKeyDelivered):
                delivered = dataclasses.replace(key_set, delivered=True, delivered_at=self._clock())
                self._ledger.put(
                    pne_id, dataclasses.replace(self._ledger.get(pne_id), key_set=delivered)
                )
                self._deliveries.pop(pne_id, None)
                try:
                    await self._ledger.save(pne_id)
                except StoreError as exc:
                    # Not stored: the Notification is offered again next time; the PNE
                    # answers it again (it already holds that key).
                    current = self._ledger.get(pne_id)
                    if current.key_set is delivered:
                        self._ledger.put(pne_id, dataclasses.replace(current, key_set=key_set))
                    log.error("txid %s: cannot store delivery to %s: %s", txid, pne_id, exc)
                    return True
                log.info("txid %s: EUKey %d delivered to PNE %s", txid, event.key_index, pne_id)
                metrics.GATEWAY_DELIVERIES.inc()
                self._unverified.pop(pne_id, None)
                self._resolve(
                    pne_id,
                    ack.txid,
                    AssignResult(ok=True, status="OK", stage="delivered", pne_id=pne_id, txid=txid),
                )
            elif isinstance(event, ProcedureFailed):
                # The proof does not verify: this link's own bytes, so this link ends;
                # the delivery stays pending and the machine is rebuilt for the next Ack.
                self._deliveries.pop(pne_id, None)
                self._note_unverified(link, ack, f"proof does not verify ({event.reason})")
                await self._pan.refuse(link, ErrorCode.AUTHENTICATION_FAILED, ack.txid)
                return False
        return True
