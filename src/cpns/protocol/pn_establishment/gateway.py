"""PN Establishment, PN GW role: the coordinator (002 §7.5.4.2, 000 §7.5.2)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto
from types import MappingProxyType
from typing import Any, ClassVar, Final

from cpns.crypto.keywrap import NONCE_LEN
from cpns.errors import (
    AuthenticationFailed,
    ErrorCode,
    RemoteProtocolError,
    UnexpectedMessage,
)
from cpns.messages.constants import TXID_LEN, AuthFlow
from cpns.messages.model import (
    AuthChallenge,
    AuthenticateRequest,
    AuthenticateResponse,
    AuthProof,
    AuthResult,
    MemberStatus,
    Message,
    PNEAuthenticateRequest,
    PNEAuthenticateResponse,
    PNEstablishmentNotify,
    PNEstablishRequest,
    PNEstablishResponse,
    PNInvite,
    PNInviteResponse,
    PNSetupRequest,
    PNSetupResponse,
    SetupEntry,
)
from cpns.protocol import tk_auth
from cpns.protocol._checks import check_addressed, check_reply_to
from cpns.protocol._machine import Event, Machine
from cpns.protocol.pn_establishment.events import (
    _AF,
    _OK,
    EstablishmentFinished,
    GatewayTKHolding,
    GatewayTKUpdated,
    LocalEUKeyStored,
    ReassignmentRequested,
    _tk_run,
    _verdict,
)
from cpns.protocol.pne_auth import open_local_eukey
from cpns.types import Random

__all__ = ["GatewayEstablishment", "GatewayState"]


# -- PN GW: the coordinator ------------------------------------------------------------------


class GatewayState(Enum):
    """States of :class:`GatewayEstablishment`, named by what the PN GW waits for."""

    EXPECT_SETUP_REQUEST = auto()
    EXPECT_INVITE_RESPONSES = auto()
    EXPECT_AUTHENTICATE_REQUEST = auto()
    EXPECT_PNE_RESPONSES = auto()
    EXPECT_ESTABLISH_RESPONSE = auto()
    DONE = auto()
    FAILED = auto()


@dataclass(slots=True)
class _Slot:
    """What the PN GW knows of one PNE of the establishment."""

    pne_id: str
    #: The PNInvite's txid (None for the originator).
    invite_txid: bytes | None = None
    rand_pne: bytes | None = None
    local_eukey: bool = False
    #: Set once the PNE's part is decided (a refusal, a timeout, or the server's result).
    outcome: ErrorCode | None = None
    flow: AuthFlow | None = None
    auth_txid: bytes | None = None
    proof: AuthProof | None = None
    tk_state: tk_auth.GatewayTKState | None = None
    tk_pending: tk_auth.GatewayTKPending | None = None
    result: AuthResult | None = None


#: The server's replies: acted on only when they answer the PN GW's own pending request.
_UPSTREAM: Final = (AuthenticateRequest, PNEstablishResponse)


def _outcome(slot: _Slot) -> ErrorCode:
    """A PNE's outcome as reported to the PNEs (undecided at the end: not authenticated)."""
    return slot.outcome if slot.outcome is not None else _AF


class GatewayEstablishment(Machine[GatewayState]):
    """PN GW role of 002 §7.5.4.2 and 000 §7.5.2: one machine per establishment.

    Inputs: messages from the originating PNE, the invited PNEs and the server
    (:meth:`receive`); :meth:`timeout` when a PNE did not answer in time; :meth:`fail`
    (``UPSTREAM_UNAVAILABLE``) when the server cannot be reached. ``tk_lookup`` gives the
    TK state and EUKey set the PN GW holds for a TK-flow PNE.

    A message from one PNE that does not fit (unknown transaction, a second answer) is
    ignored: one PNE cannot end the establishment of the others.
    """

    HOP: ClassVar[str] = "gateway"

    def __init__(
        self,
        *,
        gw_id: str,
        gw_eukey: bytes,
        server_id: str,
        rng: Random,
        tk_lookup: Callable[[str], GatewayTKHolding | None],
    ) -> None:
        super().__init__(
            GatewayState.EXPECT_SETUP_REQUEST, done=GatewayState.DONE, failed=GatewayState.FAILED
        )
        self._gw_id = gw_id
        self._gw_eukey = gw_eukey
        self._server_id = server_id
        self._rng = rng
        self._tk_lookup = tk_lookup
        self._setup: PNSetupRequest | None = None
        self._slots: dict[str, _Slot] = {}
        self._upstream: Message | None = None
        self._est_id: bytes | None = None
        self._rand_server: bytes | None = None
        self._jump: GatewayState | None = None

    @property
    def pn_id(self) -> str | None:
        """The PN being established (after the SETUP Request)."""
        return self._setup.pn_id if self._setup is not None else None

    def awaiting(self) -> list[str]:
        """The PNEs the PN GW waits for now (for the I/O layer's timers)."""
        if self._state is GatewayState.EXPECT_INVITE_RESPONSES:
            return self._awaited_invites()
        if self._state is GatewayState.EXPECT_PNE_RESPONSES:
            return self._awaited_proofs()
        return []

    def _awaited_invites(self) -> list[str]:
        return [
            s.pne_id
            for s in self._slots.values()
            if s.invite_txid is not None and s.rand_pne is None and s.outcome is None
        ]

    def _awaited_proofs(self) -> list[str]:
        return [
            s.pne_id for s in self._slots.values() if s.auth_txid is not None and s.proof is None
        ]

    # -- the machine's plumbing: a handler may choose the next state ----------------------

    def receive(self, message: Message) -> list[Event]:
        """Feed one message; the handler may move on further than the table's default
        (all PNEs answered) or stay (more answers awaited).

        Once the SETUP Request is in, a message that does not fit the current state (a
        retransmitted SETUP Request, a late answer, a message of another transaction) is
        ignored rather than failing the whole establishment: one PNE cannot end the
        establishment of the others. So is a server reply that does not answer the PN
        GW's pending upstream request (same txid, from the server, to the PN GW): a PAN
        peer cannot forge one, since it never sees that txid.
        """
        self._check_live()
        if self._setup is not None:
            if (self._state, type(message)) not in self.TRANSITIONS:
                return []
            upstream = self._upstream
            if isinstance(message, _UPSTREAM) and (
                upstream is None
                or message.txid != upstream.txid
                or message.src != upstream.dst
                or message.dst != upstream.src
            ):
                return []
        events = super().receive(message)
        jump, self._jump = self._jump, None
        if jump is not None and self._state is not self._failed:
            self._state = jump
        return events

    def timeout(self, pne_id: str) -> list[Event]:
        """The PNE did not answer in time: reported as TIMEOUT (its invitation, or its
        AUTHENTICATE Request). A PNE not awaited is ignored (a late timer)."""
        self._check_live()
        slot = self._slots.get(pne_id)
        if slot is None or pne_id not in self.awaiting():
            return []
        if self._state is GatewayState.EXPECT_INVITE_RESPONSES:
            slot.outcome = ErrorCode.TIMEOUT
            events = self._invites_answered()
        else:
            slot.proof = AuthProof(pne_id=pne_id, status=ErrorCode.TIMEOUT)
            events = self._proofs_collected()
        self._jump = None  # _goto() already moved the state
        return events

    def _failure_reply(self, incoming: Message | None, code: ErrorCode) -> Message | None:
        # The originator hears the failure in its SETUP Response, every invited PNE in its
        # PNEstablishmentNotify (queued here; the base class queues what this returns).
        setup = self._setup
        if setup is None:
            if isinstance(incoming, PNSetupRequest):
                return PNSetupResponse(
                    txid=incoming.txid, src=self._gw_id, dst=incoming.src, status=code, members=()
                )
            return None
        members = tuple(
            MemberStatus(pne_id=s.pne_id, status=code, flow=s.flow) for s in self._slots.values()
        )
        for slot in self._slots.values():
            if slot.invite_txid is not None:
                self._send(self._notify(slot, code, None))
        return PNSetupResponse(
            txid=setup.txid,
            src=self._gw_id,
            dst=setup.src,
            pn_id=setup.pn_id,
            status=code,
            est_id=self._est_id,
            members=members,
        )

    # -- 1. the SETUP Request and the invitations -------------------------------------------

    def _on_setup(self, message: Message) -> list[Event]:
        assert isinstance(message, PNSetupRequest)
        assert message.pn_id is not None
        check_addressed(message, to=self._gw_id)
        self._setup = message
        self._slots[message.src] = _Slot(
            pne_id=message.src, rand_pne=message.rand_pne, local_eukey=message.local_eukey
        )
        for pne_id in message.invite:
            if pne_id in self._slots or pne_id == self._gw_id:
                continue
            txid = self._rng.token_bytes(TXID_LEN)
            self._slots[pne_id] = _Slot(pne_id=pne_id, invite_txid=txid)
            self._send(
                PNInvite(
                    txid=txid,
                    src=self._gw_id,
                    dst=pne_id,
                    pn_id=message.pn_id,
                    flow=message.flow,
                    originator=message.src,
                )
            )
        if len(self._slots) == 1:
            self._establish()
        return []

    def _on_invite_response(self, message: Message) -> list[Event]:
        assert isinstance(message, PNInviteResponse)
        slot = self._slots.get(message.src)
        if (
            slot is None
            or slot.invite_txid != message.txid
            or message.dst != self._gw_id
            or slot.rand_pne is not None
            or slot.outcome is not None
        ):
            return []  # not a pending invitation: ignored
        if message.status is _OK and message.rand_pne is not None:
            slot.rand_pne, slot.local_eukey = message.rand_pne, message.local_eukey
        else:
            slot.outcome = message.status if message.status is not _OK else _AF
        return self._invites_answered()

    def _invites_answered(self) -> list[Event]:
        if not self._awaited_invites():
            self._establish()
        return []

    def _establish(self) -> None:
        """002 §7.5.4.2: one SETUP Request with every PNE ID and rand_PNE."""
        setup = self._setup
        assert setup is not None
        assert setup.pn_id is not None
        entries = tuple(
            SetupEntry(pne_id=s.pne_id, rand_pne=s.rand_pne, local_eukey=s.local_eukey)
            for s in self._slots.values()
            if s.rand_pne is not None and s.outcome is None
        )
        request = PNEstablishRequest(
            txid=self._rng.token_bytes(TXID_LEN),
            src=self._gw_id,
            dst=self._server_id,
            pn_id=setup.pn_id,
            flow=setup.flow,
            entries=entries,
        )
        self._upstream = request
        self._send(request)
        self._goto(GatewayState.EXPECT_AUTHENTICATE_REQUEST)

    def _goto(self, state: GatewayState) -> None:
        self._jump = state
        self._state = state  # for calls outside receive() (timeout)

    # -- 4. the server's AUTHENTICATE Request: one request per PNE ---------------------------

    def _on_authenticate_request(self, message: Message) -> list[Event]:
        assert isinstance(message, AuthenticateRequest)
        assert self._upstream is not None
        assert self._setup is not None
        check_reply_to(message, self._upstream)
        if message.status is not _OK:
            raise RemoteProtocolError(f"server refused: {message.status.name}", code=message.status)
        if message.est_id is None or message.rand_server is None:
            raise RemoteProtocolError("AUTHENTICATE Request without est_id or rand_server")
        self._est_id, self._rand_server = message.est_id, message.rand_server
        events: list[Event] = []
        challenged: set[str] = set()
        for challenge in message.entries:
            slot = self._slots.get(challenge.pne_id)
            if slot is None or slot.outcome is not None or challenge.pne_id in challenged:
                continue  # not ours, or listed twice by the server: ignored
            challenged.add(challenge.pne_id)
            if challenge.status is not _OK:
                slot.outcome = challenge.status
                continue
            slot.flow = challenge.flow
            events += self._challenge(slot, challenge)
        for slot in self._slots.values():
            if slot.outcome is None and slot.rand_pne is not None and slot.pne_id not in challenged:
                slot.outcome = _AF  # in our request, not in the server's answer
        if self._awaited_proofs():
            self._goto(GatewayState.EXPECT_PNE_RESPONSES)
            return events
        return events + self._proofs_collected()

    def _challenge(self, slot: _Slot, challenge: AuthChallenge) -> list[Event]:
        """One PNE's AUTHENTICATE Request (002 §7.5.4.2; 000 §7.5.2 for a TK PNE)."""
        setup, est_id, rand_server = self._setup, self._est_id, self._rand_server
        assert setup is not None
        assert setup.pn_id is not None
        assert est_id is not None
        assert rand_server is not None
        assert slot.rand_pne is not None
        events: list[Event] = []
        try:
            if challenge.sealed_local_gw is not None:
                local = open_local_eukey(
                    self._gw_eukey,
                    challenge.sealed_local_gw,
                    server_id=self._server_id,
                    gw_id=self._gw_id,
                    pne_id=slot.pne_id,
                    pn_id=setup.pn_id,
                    est_id=est_id,
                    holder_id=self._gw_id,
                )
                events.append(
                    LocalEUKeyStored(
                        pne_id=slot.pne_id,
                        gw_id=self._gw_id,
                        pn_id=setup.pn_id,
                        est_id=est_id,
                        local_eukey=local,
                    )
                )
            tk_fields: dict[str, Any] = {}
            if challenge.flow is AuthFlow.TK:
                tk_fields, tk_events = self._prepare_tk(slot, challenge)
                events += tk_events
            elif challenge.flow is not AuthFlow.RAND_HASH:
                raise AuthenticationFailed("no usable flow in the challenge")
        except RemoteProtocolError as exc:
            # This PNE fails alone: the PN GW's verdict goes to the server, no request.
            slot.proof = AuthProof(pne_id=slot.pne_id, status=_verdict(exc.code))
            return events
        slot.auth_txid = self._rng.token_bytes(TXID_LEN)
        self._send(
            PNEAuthenticateRequest(
                txid=slot.auth_txid,
                src=self._gw_id,
                dst=slot.pne_id,
                pn_id=setup.pn_id,
                flow=setup.flow,
                est_id=est_id,
                auth_flow=challenge.flow,
                rand_server=rand_server,
                sealed_local_eukey=challenge.sealed_local_pne,
                **tk_fields,
            )
        )
        return events

    def _prepare_tk(
        self, slot: _Slot, challenge: AuthChallenge
    ) -> tuple[dict[str, Any], list[Event]]:
        setup, est_id, rand_server = self._setup, self._est_id, self._rand_server
        assert setup is not None
        assert setup.pn_id is not None
        assert est_id is not None
        assert rand_server is not None
        assert slot.rand_pne is not None
        held = self._tk_lookup(slot.pne_id)
        if (
            held is None
            or challenge.an is None
            or challenge.tk_step is None
            or challenge.key_index is None
        ):
            raise AuthenticationFailed("no TK state for the PNE, or an incomplete challenge")
        run = _tk_run(
            setup.pn_id,
            self._gw_id,
            self._server_id,
            slot.pne_id,
            est_id,
            slot.rand_pne,
            rand_server,
        )
        prepared = tk_auth.gateway_prepare(
            held.state,
            eukeys=held.eukeys,
            run=run,
            challenge=tk_auth.TKChallenge(
                tk_step=challenge.tk_step, key_index=challenge.key_index, an=challenge.an
            ),
            nonce=self._rng.token_bytes(NONCE_LEN),
        )
        slot.tk_state, slot.tk_pending = prepared.state, prepared.pending
        fields = {
            "an": challenge.an,
            "tk_step": challenge.tk_step,
            "key_index": challenge.key_index,
            "sealed_next_eukey": prepared.sealed_next,
        }
        return fields, [GatewayTKUpdated(pne_id=slot.pne_id, state=prepared.state)]

    # -- the PNEs' AUTHENTICATE Responses, aggregated ----------------------------------------

    def _on_pne_response(self, message: Message) -> list[Event]:
        assert isinstance(message, PNEAuthenticateResponse)
        slot = self._slots.get(message.src)
        if (
            slot is None
            or slot.auth_txid != message.txid
            or slot.proof is not None
            or message.dst != self._gw_id
            or message.est_id != self._est_id
        ):
            return []  # not an awaited answer: ignored
        slot.proof = self._proof(slot, message)
        return self._proofs_collected()

    @staticmethod
    def _proof(slot: _Slot, message: PNEAuthenticateResponse) -> AuthProof:
        if message.status is not _OK:
            return AuthProof(pne_id=slot.pne_id, status=_verdict(message.status))
        if slot.flow is AuthFlow.RAND_HASH and message.hash_pne is not None:
            return AuthProof(pne_id=slot.pne_id, status=_OK, hash_pne=message.hash_pne)
        if (
            slot.flow is AuthFlow.TK
            and message.sealed_eukey is not None
            and message.key_index is not None
            and message.tk_step is not None
        ):
            return AuthProof(
                pne_id=slot.pne_id,
                status=_OK,
                sealed_eukey=message.sealed_eukey,
                key_index=message.key_index,
                tk_step=message.tk_step,
            )
        return AuthProof(pne_id=slot.pne_id, status=_AF)

    def _proofs_collected(self) -> list[Event]:
        if self._awaited_proofs():
            return []
        proofs = tuple(s.proof for s in self._slots.values() if s.proof is not None)
        if not proofs:  # every PNE refused by the server: nothing to prove
            return self._finish({})
        assert self._est_id is not None
        assert self._setup is not None
        response = AuthenticateResponse(
            txid=self._rng.token_bytes(TXID_LEN),
            src=self._gw_id,
            dst=self._server_id,
            pn_id=self._setup.pn_id,
            flow=self._setup.flow,
            est_id=self._est_id,
            entries=proofs,
        )
        self._upstream = response
        self._send(response)
        self._goto(GatewayState.EXPECT_ESTABLISH_RESPONSE)
        return []

    # -- 6. the server's SETUP Response, relayed to every PNE --------------------------------

    def _on_establish_response(self, message: Message) -> list[Event]:
        assert isinstance(message, PNEstablishResponse)
        assert self._upstream is not None
        check_reply_to(message, self._upstream)
        if message.est_id != self._est_id:
            raise UnexpectedMessage("SETUP Response for another establishment")
        if message.status not in (_OK, _AF):
            raise RemoteProtocolError(f"server refused: {message.status.name}", code=message.status)
        results: dict[str, AuthResult] = {}
        for result in message.entries:
            results.setdefault(result.pne_id, result)
        return self._finish(results)

    def _finish(self, results: dict[str, AuthResult]) -> list[Event]:
        setup = self._setup
        assert setup is not None
        assert setup.pn_id is not None
        events: list[Event] = []
        for slot in self._slots.values():
            if slot.proof is None:
                continue
            result = results.get(slot.pne_id)
            if result is None:
                result = AuthResult(pne_id=slot.pne_id, status=_AF, flow=slot.flow, reassign=False)
            slot.result, slot.outcome = result, result.status
            if result.status is _OK and slot.tk_state is not None and slot.tk_pending is not None:
                state = tk_auth.gateway_confirmed(slot.tk_state, slot.tk_pending)
                events.append(GatewayTKUpdated(pne_id=slot.pne_id, state=state))
            if result.reassign:
                reason = ErrorCode.CHAIN_EXHAUSTED if result.status is _OK else result.status
                events.append(ReassignmentRequested(pne_id=slot.pne_id, reason=reason))
        members = tuple(
            MemberStatus(pne_id=s.pne_id, status=_outcome(s), flow=s.flow)
            for s in self._slots.values()
        )
        originator = self._slots[setup.src]
        own = originator.result
        self._send(
            PNSetupResponse(
                txid=setup.txid,
                src=self._gw_id,
                dst=setup.src,
                pn_id=setup.pn_id,
                flow=setup.flow,
                status=_outcome(originator),
                est_id=self._est_id,
                hash_server=own.hash_server if own is not None else None,
                members=members,
                confirm=own.confirm if own is not None else None,
            )
        )
        for slot in self._slots.values():
            if slot.invite_txid is not None:
                self._send(self._notify(slot, _outcome(slot), slot.result))
        self._goto(GatewayState.DONE)
        events.append(
            EstablishmentFinished(pn_id=setup.pn_id, est_id=self._est_id, members=members)
        )
        return events

    def _notify(
        self, slot: _Slot, status: ErrorCode, result: AuthResult | None
    ) -> PNEstablishmentNotify:
        setup = self._setup
        assert setup is not None
        assert slot.invite_txid is not None
        return PNEstablishmentNotify(
            txid=slot.invite_txid,
            src=self._gw_id,
            dst=slot.pne_id,
            pn_id=setup.pn_id,
            flow=setup.flow,
            status=status,
            est_id=self._est_id,
            hash_server=result.hash_server if result is not None else None,
            confirm=result.confirm if result is not None else None,
        )

    TRANSITIONS = MappingProxyType(
        {
            (GatewayState.EXPECT_SETUP_REQUEST, PNSetupRequest): (
                _on_setup,
                GatewayState.EXPECT_INVITE_RESPONSES,
            ),
            (GatewayState.EXPECT_INVITE_RESPONSES, PNInviteResponse): (
                _on_invite_response,
                GatewayState.EXPECT_INVITE_RESPONSES,
            ),
            (GatewayState.EXPECT_AUTHENTICATE_REQUEST, AuthenticateRequest): (
                _on_authenticate_request,
                GatewayState.EXPECT_ESTABLISH_RESPONSE,
            ),
            (GatewayState.EXPECT_PNE_RESPONSES, PNEAuthenticateResponse): (
                _on_pne_response,
                GatewayState.EXPECT_PNE_RESPONSES,
            ),
            (GatewayState.EXPECT_ESTABLISH_RESPONSE, PNEstablishResponse): (
                _on_establish_response,
                GatewayState.DONE,
            ),
        }
    )
