"""The PN GW's part of PN Establishment (002 §7.5.4.2, 000 §7.5.2) and of the LocalEUKey
authentication with a PNE (the "7.5.5" 002 §7.5.4 refers to).

:class:`PNEstablishmentCoordinator` drives one
:class:`~cpns.protocol.pn_establishment.GatewayEstablishment` machine per establishment and
one :class:`~cpns.protocol.local_auth.LocalAuthGateway` per local authentication, over the
PAN side, the server link and the PNE records. It reads as the seed section:

1. The originating PNE's SETUP Request (:class:`PNSetupRequest`) arrives on its PAN link
   (its ``src`` must be the link's PNE). A run starts, in the request's flow (one per
   originating PNE at a time: another is refused ``TOO_MANY_ATTEMPTS``).
2. The PN GW sends a PN_INVITE (the PN GW's SETUP Request to an invited PNE) to each
   invited PNE on its PAN link; an invited PNE that is not attached, or does not answer
   within ``answer_timeout``, is reported to the machine as ``TIMEOUT`` and the others go
   on (002 §7.5.4.1).
3. With every SETUP Response in, one SETUP Request (:class:`PNEstablishRequest`, every PNE
   ID and rand_PNE) goes upstream (002 §7.5.4.2).
4. The server's AUTHENTICATE Request is fed to the machine, which opens the gateway's
   LocalEUKey copies and builds one AUTHENTICATE Request per PNE; for a TK-flow PNE it
   checks AN and seals the next EUKey of the set under the TK
   (:func:`~cpns.protocol.tk_auth.gateway_prepare`, with the TK state and key set from the
   PNE's record). Facts come out as events and are **persisted before** the requests go
   out: the gateway's TK state (:class:`~cpns.gateway.records.TKHolding`), the LocalEUKeys.
5. The PNEs' AUTHENTICATE Responses are aggregated (a PNE silent for ``answer_timeout`` is
   ``TIMEOUT``) into one AUTHENTICATE Response upstream.
6. The server's SETUP Response is fed to the machine: for each TK PNE the server said OK
   for, the TK state advances (:func:`~cpns.protocol.tk_auth.gateway_confirmed`), stored;
   a PNE whose result says ``reassign`` gets a 003 re-assignment queued in its record
   (``reassign``, shown by ``cpns gateway status``: the operator runs ``cpns gateway
   assign``, which needs the user's password); the memberships and the routing table
   PN ID -> member PNEs are stored; then the SETUP Response goes to the originator and a
   PNEstablishmentNotify to each invited PNE.

Upstream retries are idempotent: the server link resends the identical body (same txid),
and a run whose exchange failed every try resends the same message once more before it
gives up with ``UPSTREAM_UNAVAILABLE`` (every PNE is told). The server answers a known
transaction from its stored reply, so a retry can never challenge or advance twice.

LocalEUKey authentication: a PNE that holds a LocalEUKey for a PN sends
:class:`LocalAuthRequest`; the PN GW plays the server's part with the LocalEUKey it
stored for (PNE, PN) and, on success, stores the session key in the membership
(``local_sk``): the key protecting that PNE's PAN traffic with this PN GW on a PAN that
is not a Secure PAN (docs/procedures/pn-establishment.md).

Logs carry Entity IDs, PN IDs, txids and status names, never a key, TK, rand or hash.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from cpns.errors import AuthenticationFailed, ErrorCode, StoreError, TransportError
from cpns.flow import log_hop
from cpns.gateway.ledger import PNELedger
from cpns.gateway.procedures import PAN, Link
from cpns.gateway.procedures.enrolment import code_name
from cpns.gateway.records import Membership, PNERecord, TKHolding, pn_routes
from cpns.gateway.upstream import Upstream
from cpns.messages.model import (
    LocalAuthRequest,
    MemberStatus,
    Message,
    PNEAuthenticateRequest,
    PNEAuthenticateResponse,
    PNInvite,
    PNInviteResponse,
    PNSetupRequest,
    PNSetupResponse,
)
from cpns.protocol import tk_auth
from cpns.protocol._machine import Event, ProcedureFailed
from cpns.protocol.local_auth import LocalAuthGateway, LocalSessionEstablished
from cpns.protocol.pn_establishment import (
    EstablishmentFinished,
    GatewayEstablishment,
    GatewayTKHolding,
    GatewayTKUpdated,
    LocalEUKeyStored,
    ReassignmentRequested,
    flow_name,
)
from cpns.types import Random

__all__ = ["EstablishmentOutcome", "PNEstablishmentCoordinator"]

log = logging.getLogger("cpns.gateway")

#: Times a run sends the same upstream message when the server link failed every try.
_UPSTREAM_ROUNDS: Final = 2
#: Finished runs remembered (a repeated SETUP Request of one of them is not run again).
_KEEP_FINISHED: Final = 256


@dataclass(frozen=True, slots=True)
class EstablishmentOutcome:
    """How one establishment ended at the PN GW (logs, status and tests)."""

    #: PN ID.
    pn_id: str
    #: The originating PNE.
    originator: str
    #: The establishment's ID (hex), if the server named it.
    est_id: str | None
    #: Every PNE's outcome, originator first.
    members: tuple[MemberStatus, ...]
    #: Why the run failed as a whole (ErrorCode name), or None.
    failure: str | None = None


@dataclass(slots=True)
class _Run:
    """One machine (an establishment or a local authentication) and its inputs."""

    machine: GatewayEstablishment | LocalAuthGateway
    pn_id: str
    originator: str
    inbox: asyncio.Queue[Message] = field(default_factory=asyncio.Queue)
    #: txids of the PAN messages this run sent (their answers come back with them).
    txids: set[bytes] = field(default_factory=set)
    outcome: EstablishmentOutcome | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class PNEstablishmentCoordinator:
    """Runs the PN GW's part of PN Establishment and of the LocalEUKey authentication.

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
        answer_timeout: float = 10.0,
    ) -> None:
        self._gateway_id = gateway_id
        self._server_id = server_id
        self._ledger = ledger
        self._pan = pan
        self._rng = rng
        self._clock = clock
        self._answer_timeout = answer_timeout
        self._eukey: bytes | None = None
        self._upstream: Upstream | None = None
        #: (originator, setup txid) -> its run (finished ones are kept for a resend).
        self._runs: dict[tuple[str, bytes], _Run] = {}
        #: txid of a PAN message sent -> the run that sent it.
        self._by_txid: dict[bytes, _Run] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: The routing table: PN ID -> its member PNEs (rebuilt from the records by bind).
        self.routes: dict[str, tuple[str, ...]] = {}
        #: Outcomes of finished establishments, newest last (bounded).
        self.outcomes: list[EstablishmentOutcome] = []

    def __repr__(self) -> str:
        return f"<PNEstablishmentCoordinator {self._gateway_id} {len(self._tasks)} running>"

    def bind(self, eukey: bytes, upstream: Upstream) -> None:
        """The gateway's EUKey (opens its LocalEUKey copies) and the server link."""
        self._eukey, self._upstream = eukey, upstream
        self.routes = pn_routes(self._ledger.records)

    def running(self) -> list[tuple[str, str]]:
        """(PN ID, originating PNE) of every establishment running now."""
        return [(r.pn_id, r.originator) for r in self._runs.values() if not r.done.is_set()]

    async def wait_idle(self) -> None:
        """Wait until no establishment or local authentication is running."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Cancel the running establishments (at shutdown)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # -- what the PAN side hands over ------------------------------------------------------

    async def _own(self, link: Link, message: Message, *, log_it: bool = True) -> bool:
        """Whether ``message`` names the link's PNE (else: a peer fault, the link ends)."""
        if message.src == link.pne_id:
            if log_it:
                log_hop(log, "received", message, "pne")
            return True
        log_hop(log, "received", message, "pne", level=logging.DEBUG)
        self._pan.peer_fault(link, f"{message.TYPE.name} for another PNE", message.src)
        await self._pan.refuse(link, ErrorCode.NOT_AUTHORIZED, message.txid)
        return False

    async def on_setup(self, link: Link, message: Message) -> bool:
        """The originating PNE's SETUP Request (002 §7.5.4.1): start a run."""
        assert isinstance(message, PNSetupRequest)
        if not await self._own(link, message):
            return False
        assert message.pn_id is not None
        key = (message.src, message.txid)
        known = self._runs.get(key)
        if known is not None:
            if known.done.is_set():
                log.info(
                    "PN %s: SETUP Request of %s (txid %s) again: the establishment ended",
                    message.pn_id,
                    message.src,
                    message.txid.hex(),
                )
            return True  # running: its answer comes; ended: the PNE was answered
        if any(r.originator == message.src and not r.done.is_set() for r in self._runs.values()):
            # One establishment per originating PNE at a time: a PNE cannot make the PN GW
            # (and the server) run many at once.
            log.info(
                "PN %s: %s already originates a running establishment: refused",
                message.pn_id,
                message.src,
            )
            await link.send(
                PNSetupResponse(
                    txid=message.txid,
                    src=self._gateway_id,
                    dst=message.src,
                    pn_id=message.pn_id,
                    flow=message.flow,
                    status=ErrorCode.TOO_MANY_ATTEMPTS,
                    members=(),
                )
            )
            return True
        self._forget_finished()
        machine = GatewayEstablishment(
            gw_id=self._gateway_id,
            gw_eukey=self._require_eukey(),
            server_id=self._server_id,
            rng=self._rng,
            tk_lookup=self._tk_lookup,
        )
        run = _Run(machine=machine, pn_id=message.pn_id, originator=message.src)
        self._runs[key] = run
        log.info(
            "PN %s: establishment requested by %s (txid %s), %d PNE(s) invited%s",
            message.pn_id,
            message.src,
            message.txid.hex(),
            len(message.invite),
            ", LocalEUKey asked" if message.local_eukey else "",
        )
        run.inbox.put_nowait(message)
        self._spawn(self._drive(run))
        return True

    async def on_pne_message(self, link: Link, message: Message) -> bool:
        """An invited PNE's SETUP Response, or a PNE's AUTHENTICATE Response: to the run
        that sent the request it answers (by txid); anything else is ignored."""
        assert isinstance(message, PNInviteResponse | PNEAuthenticateResponse)
        if not await self._own(link, message, log_it=False):
            return False
        run = self._by_txid.get(message.txid)
        if run is None or run.done.is_set():
            # Late or unsolicited: at DEBUG, and one budgeted line (D-PAN-4).
            log_hop(log, "received", message, "pne", level=logging.DEBUG)
            if self._pan.log_allowed():
                log.info(
                    "%s from %s (txid %s) answers no running establishment: ignored",
                    message.TYPE.name,
                    message.src,
                    message.txid.hex(),
                )
            return True
        log_hop(log, "received", message, "pne")
        run.inbox.put_nowait(message)
        return True

    async def on_local_request(self, link: Link, message: Message) -> bool:
        """A PNE's LocalAuthRequest ("7.5.5"): the PN GW in the server's part."""
        assert isinstance(message, LocalAuthRequest)
        if not await self._own(link, message):
            return False
        assert message.pn_id is not None
        known = self._by_txid.get(message.txid)
        if known is not None:
            if not known.done.is_set():
                known.inbox.put_nowait(message)  # a resend: the machine answers it again
            return True
        machine = LocalAuthGateway(
            gw_id=self._gateway_id, local_eukey=self._local_eukey, rng=self._rng
        )
        run = _Run(machine=machine, pn_id=message.pn_id, originator=message.src)
        run.txids.add(message.txid)
        self._by_txid[message.txid] = run
        run.inbox.put_nowait(message)
        self._spawn(self._drive(run))
        return True

    def _forget_finished(self) -> None:
        finished = [k for k, r in self._runs.items() if r.done.is_set()]
        for key in finished[: max(0, len(finished) - _KEEP_FINISHED)]:
            del self._runs[key]

    # -- lookups the machines use ------------------------------------------------------------

    def _require_eukey(self) -> bytes:
        assert self._eukey is not None, "bind() first"
        return self._eukey

    def _tk_lookup(self, pne_id: str) -> GatewayTKHolding | None:
        """The TK state and EUKey set the gateway holds for a TK-flow PNE (its record)."""
        record = self._ledger.get(pne_id)
        held = record.tk_holding()
        if held is None or record.key_set is None:
            return None
        tk, step = held
        return GatewayTKHolding(
            state=tk_auth.GatewayTKState(tk=tk, tk_step=step), eukeys=record.key_set.eukeys
        )

    def _local_eukey(self, pne_id: str, pn_id: str) -> bytes | None:
        membership = self._ledger.get(pne_id).membership(pn_id)
        return membership.local_eukey if membership is not None else None

    # -- one run ---------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drive(self, run: _Run) -> None:
        """Feed the run's inputs to its machine until it ends; time out silent PNEs."""
        machine = run.machine
        deadline: float | None = None
        phase: object = None
        loop = asyncio.get_running_loop()
        try:
            while not machine.terminal:
                if not run.inbox.empty():
                    await self._apply(run, machine.receive(run.inbox.get_nowait()))
                    await self._flush(run)
                    continue
                waiting = machine.awaiting() if isinstance(machine, GatewayEstablishment) else []
                if machine.state is not phase:  # a new phase: a new answer budget
                    phase, deadline = machine.state, loop.time() + self._answer_timeout
                assert deadline is not None
                try:
                    message = await asyncio.wait_for(run.inbox.get(), deadline - loop.time())
                except TimeoutError:
                    await self._time_out(run, waiting)
                    continue
                await self._apply(run, machine.receive(message))
                await self._flush(run)
        except StoreError as exc:
            log.error("PN %s: cannot store the establishment's facts: %s", run.pn_id, exc)
            if not machine.terminal:
                machine.fail(ErrorCode.INTERNAL_ERROR, "store write failed")
                await self._flush(run, persist=False)
        finally:
            run.done.set()
            for txid in run.txids:
                self._by_txid.pop(txid, None)

    async def _time_out(self, run: _Run, waiting: list[str]) -> None:
        machine = run.machine
        if isinstance(machine, GatewayEstablishment) and not waiting:
            # Nothing awaited from the PAN and no answer: cannot happen while the server
            # exchange runs inline; end the run rather than spin.
            await self._apply(run, machine.fail(ErrorCode.TIMEOUT, "no progress"))
        elif isinstance(machine, GatewayEstablishment):
            for pne_id in waiting:
                if not machine.terminal:
                    log.info("PN %s: PNE %s did not answer in time", run.pn_id, pne_id)
                    await self._apply(run, machine.timeout(pne_id))
        elif not machine.terminal:
            await self._apply(
                run, machine.fail(ErrorCode.TIMEOUT, "the PNE did not answer the challenge")
            )
        await self._flush(run)

    async def _flush(self, run: _Run, *, persist: bool = True) -> None:
        """Send what the machine queued: PAN messages to their PNEs, upstream messages to
        the server (whose answers are fed back, their facts stored, and so on)."""
        machine = run.machine
        while out := machine.messages_to_send():
            absent: list[str] = []
            for message in out:
                if message.dst == self._server_id:
                    reply = await self._exchange(run, message)
                    if machine.terminal:
                        continue
                    before = machine.state
                    events = (
                        machine.receive(reply)
                        if isinstance(reply, Message)
                        else machine.fail(ErrorCode.UPSTREAM_UNAVAILABLE, reply)
                    )
                    if not machine.terminal and machine.state is before:
                        # The machine ignored a reply that does not answer the request:
                        # nothing else will come on this exchange.
                        events += machine.fail(
                            ErrorCode.UPSTREAM_UNAVAILABLE,
                            "the server's reply does not answer the request",
                        )
                    if persist:
                        await self._apply(run, events)
                    continue
                if isinstance(message, PNInvite | PNEAuthenticateRequest):
                    run.txids.add(message.txid)
                    self._by_txid[message.txid] = run
                if not await self._to_pne(message):
                    absent.append(message.dst)
            if isinstance(machine, GatewayEstablishment) and not machine.terminal:
                for pne_id in absent:
                    if pne_id in machine.awaiting():
                        log.info("PN %s: PNE %s is not attached", run.pn_id, pne_id)
                        await self._apply(run, machine.timeout(pne_id))

    async def _to_pne(self, message: Message) -> bool:
        """Send on the PNE's newest live link; False if none took it."""
        for link in reversed(self._pan.links(message.dst)):
            if await link.send(message):
                return True
        return False

    async def _exchange(self, run: _Run, message: Message) -> Message | str:
        """One upstream exchange (the same message again if every try failed); the reply,
        or why there is none."""
        assert self._upstream is not None, "bind() first"
        why = ""
        for _ in range(_UPSTREAM_ROUNDS):
            try:
                return await self._upstream.exchange(message)
            except TransportError as exc:
                why = f"server unreachable: {exc}"
            except AuthenticationFailed as exc:
                why = f"Digest failed on the server link: {exc}"
            log.warning("PN %s: txid %s upstream: %s", run.pn_id, message.txid.hex(), why)
        return why

    # -- facts to store, before what depends on them is sent ---------------------------------

    async def _apply(self, run: _Run, events: list[Event]) -> None:
        """Store the events' facts: every PNE record changed, in one group commit of the
        ledger, before the caller sends what depends on them."""
        dirty: set[str] = set()
        for event in events:
            if isinstance(event, GatewayTKUpdated):
                record = self._ledger.get(event.pne_id)
                holding = TKHolding(
                    tk=event.state.tk,
                    tk_step=event.state.tk_step,
                    set_txid=record.key_set.txid if record.key_set is not None else b"",
                )
                self._put(dirty, event.pne_id, dataclasses.replace(record, tk_state=holding))
            elif isinstance(event, LocalEUKeyStored):
                self._store_local(dirty, event)
            elif isinstance(event, ReassignmentRequested):
                log.warning(
                    "PNE %s: the server asks for a 003 re-assignment (%s); queued: "
                    "run 'cpns gateway assign --pne %s'",
                    event.pne_id,
                    event.reason.name,
                    event.pne_id,
                )
                record = self._ledger.get(event.pne_id)
                self._put(
                    dirty, event.pne_id, dataclasses.replace(record, reassign=event.reason.name)
                )
            elif isinstance(event, EstablishmentFinished):
                self._finished(dirty, run, event)
            elif isinstance(event, LocalSessionEstablished):
                self._local_session(dirty, event)
            elif isinstance(event, ProcedureFailed):
                log.warning(
                    "PN %s (%s): %s at %s: %s",
                    run.pn_id,
                    run.originator,
                    code_name(event.code),
                    event.hop,
                    event.reason,
                )
                if isinstance(run.machine, GatewayEstablishment):
                    self._record_outcome(
                        run,
                        EstablishmentOutcome(
                            pn_id=run.pn_id,
                            originator=run.originator,
                            est_id=None,
                            members=(),
                            failure=code_name(event.code),
                        ),
                    )

        if dirty:
            await asyncio.gather(*(self._ledger.save(pne_id) for pne_id in sorted(dirty)))

    def _put(self, dirty: set[str], pne_id: str, record: PNERecord) -> None:
        self._ledger.put(pne_id, record)
        dirty.add(pne_id)

    def _store_local(self, dirty: set[str], event: LocalEUKeyStored) -> None:
        record = self._ledger.get(event.pne_id)
        old = record.membership(event.pn_id)
        membership = Membership(
            pn_id=event.pn_id,
            est_id=event.est_id.hex(),
            status=old.status if old is not None else "pending",
            flow=old.flow if old is not None else "",
            at=self._clock(),
            local_eukey=event.local_eukey,
        )
        self._put(dirty, event.pne_id, record.with_membership(membership))

    def _finished(self, dirty: set[str], run: _Run, event: EstablishmentFinished) -> None:
        """Memberships and the routing table, stored before the results are relayed."""
        now = self._clock()
        est = event.est_id.hex() if event.est_id is not None else None
        for member in event.members:
            record = self._ledger.get(member.pne_id)
            old = record.membership(event.pn_id)
            joined = member.status is ErrorCode.OK
            local = old.local_eukey if old is not None and old.est_id == est else None
            membership = Membership(
                pn_id=event.pn_id,
                est_id=est,
                status="member" if joined else code_name(member.status),
                flow=flow_name(member.flow),
                at=now,
                local_eukey=local,
            )
            self._put(dirty, member.pne_id, record.with_membership(membership))
            log.info(
                "PN %s: PNE %s %s (%s)",
                event.pn_id,
                member.pne_id,
                "joined" if joined else f"not joined: {code_name(member.status)}",
                flow_name(member.flow) or "no flow",
            )
        self.routes = pn_routes(self._ledger.records)
        self._record_outcome(
            run,
            EstablishmentOutcome(
                pn_id=event.pn_id, originator=run.originator, est_id=est, members=event.members
            ),
        )

    def _record_outcome(self, run: _Run, outcome: EstablishmentOutcome) -> None:
        run.outcome = outcome
        self.outcomes = [*self.outcomes[-31:], outcome]

    def _local_session(self, dirty: set[str], event: LocalSessionEstablished) -> None:
        record = self._ledger.get(event.pne_id)
        old = record.membership(event.pn_id)
        if old is None:  # the machine only runs with a stored LocalEUKey
            return
        updated = dataclasses.replace(old, local_sk=event.sk, local_at=self._clock())
        self._put(dirty, event.pne_id, record.with_membership(updated))
        log.info(
            "PNE %s and PN GW authenticated with the LocalEUKey of PN %s; session key stored",
            event.pne_id,
            event.pn_id,
        )
