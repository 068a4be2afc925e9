"""PN Establishment with mutual authentication of every PNE and the CPNS Server
(002 §7.5.4 rand/hash, 000 §7.5 TK-based), one machine per role.

Theory of operation
-------------------
Parties: the originating PNE, the invited PNEs, their PN GW and the CPNS Server.

1. The originating PNE sends its SETUP Request (PNE ID, rand_PNE, LocalEUKey need, the
   PNEs it invites); the PN GW invites each of them (PNInvite) and collects their SETUP
   Responses (rand_PNE, LocalEUKey need); one that does not answer in time is reported by
   the I/O layer (``timeout(pne_id)``) and left out (002 §7.5.4.1).
2. The PN GW sends the server one SETUP Request with every PNE ID and rand_PNE
   (002 §7.5.4.2).
3. The server checks each PNE alone (unknown, revoked, another user's, listed twice),
   chooses its flow (TK for a PNE whose chain came from a 003 assignment, rand/hash for a
   PNE enrolled with UI), draws one rand_server, generates and seals the LocalEUKeys, and
   answers with the AUTHENTICATE Request; the facts to keep (the pending establishment)
   come out as :class:`EstablishmentPending` (002 §7.5.4.3, 000 §7.5.3).
4. The PN GW opens its LocalEUKey copies, builds one AUTHENTICATE Request per PNE (for a
   TK PNE: checks AN, seals the next EUKey under the TK, :func:`tk_auth.gateway_prepare`)
   and collects the AUTHENTICATE Responses into one for the server; a PNE that does not
   answer in time is reported as ``TIMEOUT``.
5. Each PNE computes SK and hash_PNE (or, TK: checks AN, seals its current EUKey,
   :func:`tk_auth.pne_answer`) and opens its LocalEUKey copy.
6. The server, from the stored pending establishment, verifies every proof alone, computes
   hash_server (or the TK key confirmation), reports the PN inventory and TK/index advances
   as events and answers the SETUP Response; the PN GW relays each PNE's value in the
   SETUP Response (originator) or PNEstablishmentNotify (invited), and each PNE verifies
   it before it counts itself a member.

The rule for many PNEs: **a PNE that fails, fails alone**. Its refusal or failed proof is
reported for it (one opaque ``AUTHENTICATION_FAILED`` for any proof that does not
verify); the others go on. The server's SETUP Response is ``OK`` when at least one PNE
joined.

Each role is a :class:`~cpns.protocol._machine.Machine` with a transition table; stored
facts come in through the constructor or injected lookups, facts to persist go out as
events, and nothing here does I/O, reads a clock or draws randomness of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto
from types import MappingProxyType
from typing import Any, ClassVar, Final

from cpns.crypto.keywrap import NONCE_LEN
from cpns.errors import (
    AuthenticationFailed,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    UnexpectedMessage,
)
from cpns.messages.constants import EST_ID_LEN, TXID_LEN, AuthFlow
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
from cpns.protocol.pne_auth import (
    ESTABLISHMENT,
    AuthContext,
    RandHashResponder,
    open_local_eukey,
    seal_local_eukey,
    verify_proof,
)
from cpns.records import EntityRecord
from cpns.types import EntityKind, Random

__all__ = [
    "PENDING_TTL",
    "EstablishmentFinished",
    "EstablishmentLookups",
    "EstablishmentPending",
    "GatewayEstablishment",
    "GatewayState",
    "GatewayTKHolding",
    "GatewayTKUpdated",
    "InvitedPNE",
    "LocalEUKeyStored",
    "OriginatingPNE",
    "PNEJoined",
    "PNEResult",
    "PNEState",
    "PNETKUpdated",
    "PNEstablished",
    "PendingPNE",
    "ReassignmentRequested",
    "ServerCompletion",
    "ServerCompletionState",
    "ServerSetup",
    "ServerSetupState",
    "TKAdvanced",
    "flow_name",
]

#: Seconds the server keeps a pending establishment (between 44 and 47).
PENDING_TTL: Final = 300
#: Statuses a PN GW (or a PNE) may report for a PNE instead of a proof; any other
#: non-OK status counts as AUTHENTICATION_FAILED.
_VERDICTS: Final = frozenset(
    {ErrorCode.TIMEOUT, ErrorCode.AUTHENTICATION_FAILED, ErrorCode.STALE_CREDENTIAL}
)
_OK: Final = ErrorCode.OK
_AF: Final = ErrorCode.AUTHENTICATION_FAILED


#: How the store and the PN inventory write a flow.
_FLOW_NAMES: Final = {AuthFlow.RAND_HASH: "rand-hash", AuthFlow.TK: "tk", AuthFlow.LOCAL: "local"}


def flow_name(flow: AuthFlow | None) -> str:
    """The flow as the store and the PN inventory write it: "rand-hash", "tk", or "" (none
    chosen: the PNE was refused first)."""
    return _FLOW_NAMES[flow] if flow is not None else ""


def _ctx(pn_id: str, gw_id: str, server_id: str, pne_id: str) -> AuthContext:
    return AuthContext(pn_id=pn_id, gw_id=gw_id, server_id=server_id, pne_id=pne_id)


def _verdict(status: ErrorCode | int) -> ErrorCode:
    return status if isinstance(status, ErrorCode) and status in _VERDICTS else _AF


# -- records and events ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingPNE:
    """One PNE of a pending establishment, as the server challenged (or refused) it."""

    #: PNE Entity ID.
    pne_id: str
    #: Its rand_PNE.
    rand_pne: bytes
    #: OK, or why the server refused it at the SETUP Request.
    status: ErrorCode
    #: The flow chosen (None when refused).
    flow: AuthFlow | None = None
    #: The LocalEUKey generated for it, if it asked for one.
    local_eukey: bytes | None = field(default=None, repr=False)
    #: TK flow: the step t of the challenge.
    tk_step: int | None = None
    #: TK flow: the index i the PNE must prove.
    key_index: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EstablishmentPending(Event):
    """Server: keep this until the AUTHENTICATE Response (stored before the reply is sent;
    keyed (gw_id, est_id); the store's PendingEstablishment is built from it)."""

    #: The PN GW.
    gw_id: str
    #: The establishment's ID.
    est_id: bytes
    #: PN ID.
    pn_id: str
    #: rand_server.
    rand_server: bytes = field(repr=False)
    #: Epoch seconds.
    created_at: int
    #: Epoch seconds after which the AUTHENTICATE Response is UNKNOWN_ESTABLISHMENT.
    expires_at: int
    #: One entry per distinct PNE of the request, in its order (duplicates left out).
    entries: tuple[PendingPNE, ...]

    def entry(self, pne_id: str) -> PendingPNE | None:
        """The entry of ``pne_id``, or None."""
        return next((e for e in self.entries if e.pne_id == pne_id), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class PNEResult:
    """One PNE's outcome of an establishment (the PN inventory's member or failure)."""

    #: PNE Entity ID.
    pne_id: str
    #: OK (a member) or why not.
    status: ErrorCode
    #: The flow it used (None when refused before a flow was chosen).
    flow: AuthFlow | None
    #: The PNE must be re-assigned (003): chain exhausted or stale.
    reassign: bool = False
    #: The session key shared with the PNE (on OK).
    sk: bytes | None = field(default=None, repr=False)

    @property
    def joined(self) -> bool:
        """Whether the PNE is a member."""
        return self.status is _OK


@dataclass(frozen=True, slots=True, kw_only=True)
class TKAdvanced(Event):
    """Server: a TK-flow PNE proved EUKey_k at step t: store TK_{t+1} and the next index,
    each by compare and set against the values the check was made with."""

    #: PNE Entity ID.
    pne_id: str
    #: TK_{t+1}.
    tk: bytes = field(repr=False)
    #: t + 1.
    tk_step: int
    #: The TK step stored when the check was made.
    expected_step: int
    #: The index to store (k + 1, or k when the chain is exhausted).
    key_index: int
    #: The index stored when the check was made.
    expected_index: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PNEstablished(Event):
    """Server: the establishment ended; upsert the PN inventory with every PNE's result,
    delete the pending establishment, in the same transaction as the reply."""

    #: PN ID.
    pn_id: str
    #: The PN GW.
    gw_id: str
    #: The CPNS User owning the PN GW (and every member).
    owner: str
    #: The establishment's ID (the pending row to delete).
    est_id: bytes
    #: Epoch seconds.
    at: int
    #: Every PNE of the establishment (refused ones included), in request order.
    results: tuple[PNEResult, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalEUKeyStored(Event):
    """PN GW or PNE: store this LocalEUKey (002 §7.5.4.1/.2: "decrypt ... and store")."""

    #: The PNE the key is shared with (for the PN GW) or the PNE itself.
    pne_id: str
    #: The PN GW.
    gw_id: str
    #: PN ID.
    pn_id: str
    #: The establishment that delivered it.
    est_id: bytes
    #: The LocalEUKey.
    local_eukey: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class GatewayTKHolding:
    """What a PN GW holds for a TK-flow PNE: its TK state and the PNE's EUKey set."""

    #: TK_g and g.
    state: tk_auth.GatewayTKState
    #: [EUKey_1..EUKey_n].
    eukeys: tuple[bytes, ...] = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayTKUpdated(Event):
    """PN GW: store this TK state for the PNE (before sending what depends on it)."""

    #: PNE Entity ID.
    pne_id: str
    #: The new state.
    state: tk_auth.GatewayTKState


@dataclass(frozen=True, slots=True, kw_only=True)
class ReassignmentRequested(Event):
    """PN GW: the server asks for a 003 re-assignment of this PNE (chain exhausted or a
    stale credential); the PNE keeps working with its current key meanwhile."""

    #: PNE Entity ID.
    pne_id: str
    #: Why: CHAIN_EXHAUSTED (the PNE joined) or STALE_CREDENTIAL.
    reason: ErrorCode


@dataclass(frozen=True, slots=True, kw_only=True)
class EstablishmentFinished(Event):
    """PN GW: the establishment ended; every PNE's outcome as sent to the originator."""

    #: PN ID.
    pn_id: str
    #: The establishment's ID (None if the server never named it).
    est_id: bytes | None
    #: Every PNE (originator first) and its outcome.
    members: tuple[MemberStatus, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class PNETKUpdated(Event):
    """PNE: store this TK-flow state (before sending the response that depends on it)."""

    #: The new state.
    state: tk_auth.PNETKState


@dataclass(frozen=True, slots=True, kw_only=True)
class PNEJoined(Event):
    """PNE: the server is authenticated and the PNE is a member of the PN."""

    #: PN ID.
    pn_id: str
    #: The PN GW.
    gw_id: str
    #: The establishment's ID.
    est_id: bytes
    #: The flow used.
    flow: AuthFlow
    #: The session key shared with the server.
    sk: bytes = field(repr=False)
    #: Every PNE's outcome (the originator's SETUP Response; empty for an invited PNE).
    members: tuple[MemberStatus, ...] = ()


# -- CPNS Server, first half: SETUP Request -> AUTHENTICATE Request ---------------------------


@dataclass(frozen=True, slots=True)
class EstablishmentLookups:
    """Synchronous reads the server roles need (injected; the store provides them)."""

    #: Entity by Entity ID.
    get_entity: Callable[[str], EntityRecord | None]
    #: A PNE's TK state (TK_s, s), or None without TK record.
    get_tk_state: Callable[[str], tuple[bytes, int] | None]


class ServerSetupState(Enum):
    """States of :class:`ServerSetup`."""

    EXPECT_REQUEST = auto()
    DONE = auto()
    FAILED = auto()


def _requesting_gateway(lookups: EstablishmentLookups, requester: str) -> EntityRecord:
    gateway = lookups.get_entity(requester)
    if gateway is None or gateway.kind is not EntityKind.PN_GW or gateway.eukey is None:
        raise RemoteProtocolError(
            "requester is not a PN GW with an EUKey", code=ErrorCode.NOT_AUTHORIZED
        )
    if gateway.revoked:
        raise RemoteProtocolError("requesting PN GW is revoked", code=ErrorCode.ENTITY_REVOKED)
    return gateway


class ServerSetup(Machine[ServerSetupState]):
    """CPNS Server on the PN GW's SETUP Request (002 §7.5.4.3 first paragraph, 000 §7.5.3).

    ``requester`` is the PN GW that Digest authenticated. One request in, the AUTHENTICATE
    Request out, and :class:`EstablishmentPending` to store first.
    """

    HOP: ClassVar[str] = "server"

    def __init__(
        self,
        *,
        server_id: str,
        requester: str,
        lookups: EstablishmentLookups,
        rng: Random,
        now: int,
        ttl: int = PENDING_TTL,
    ) -> None:
        super().__init__(
            ServerSetupState.EXPECT_REQUEST,
            done=ServerSetupState.DONE,
            failed=ServerSetupState.FAILED,
        )
        self._server_id = server_id
        self._requester = requester
        self._lookups = lookups
        self._rng = rng
        self._now = now
        self._ttl = ttl

    def _failure_reply(self, incoming: Message | None, code: ErrorCode) -> Message | None:
        if not isinstance(incoming, PNEstablishRequest):
            return None
        return AuthenticateRequest(
            txid=incoming.txid,
            src=self._server_id,
            dst=incoming.src,
            pn_id=incoming.pn_id,
            status=code,
            entries=(),
        )

    def _refusal(self, entry: SetupEntry, gateway: EntityRecord, seen: set[str]) -> ErrorCode:
        """Why this PNE cannot take part (OK if it can); 002 §7.5.4.3 and our policy."""
        if entry.pne_id in seen:
            return ErrorCode.DUPLICATE_PNE
        entity = self._lookups.get_entity(entry.pne_id)
        if entity is None:
            return ErrorCode.UNKNOWN_ENTITY
        if entity.kind is not EntityKind.PNE:
            return ErrorCode.WRONG_ENTITY_KIND
        if entity.owner != gateway.owner:
            return ErrorCode.POLICY_DENIED
        if entity.revoked:
            return ErrorCode.ENTITY_REVOKED
        if entity.eukey is None or self._flow(entity) is None:
            return ErrorCode.UNKNOWN_ENTITY
        return _OK

    def _flow(self, entity: EntityRecord) -> AuthFlow | None:
        """TK for a chain assigned through a PN GW (003) with a TK record; rand/hash for an
        EUKey enrolled with UI (004); None for a 003 chain without TK record."""
        if entity.assigned_via is None:
            return AuthFlow.RAND_HASH
        return AuthFlow.TK if self._lookups.get_tk_state(entity.entity_id) is not None else None

    def _on_request(self, message: Message) -> list[Event]:
        assert isinstance(message, PNEstablishRequest)
        assert message.pn_id is not None  # PN_ID_REQUIRED
        check_addressed(message, to=self._server_id, sender=self._requester)
        gateway = _requesting_gateway(self._lookups, self._requester)
        assert gateway.eukey is not None
        est_id = self._rng.token_bytes(EST_ID_LEN)
        rand_server = self._rng.token_bytes(32)
        seen: set[str] = set()
        challenges: list[AuthChallenge] = []
        pending: list[PendingPNE] = []
        for entry in message.entries:
            status = self._refusal(entry, gateway, seen)
            if status is ErrorCode.DUPLICATE_PNE:
                challenges.append(AuthChallenge(pne_id=entry.pne_id, status=status))
                continue
            seen.add(entry.pne_id)
            if status is not _OK:
                challenges.append(AuthChallenge(pne_id=entry.pne_id, status=status))
                pending.append(
                    PendingPNE(pne_id=entry.pne_id, rand_pne=entry.rand_pne, status=status)
                )
                continue
            entity = self._lookups.get_entity(entry.pne_id)
            assert entity is not None
            assert entity.eukey is not None
            challenge, record = self._challenge(
                message.pn_id, entry, entity, gateway.eukey, est_id, rand_server
            )
            challenges.append(challenge)
            pending.append(record)
        self._send(
            AuthenticateRequest(
                txid=message.txid,
                src=self._server_id,
                dst=message.src,
                pn_id=message.pn_id,
                status=_OK,
                est_id=est_id,
                rand_server=rand_server,
                entries=tuple(challenges),
            )
        )
        return [
            EstablishmentPending(
                gw_id=self._requester,
                est_id=est_id,
                pn_id=message.pn_id,
                rand_server=rand_server,
                created_at=self._now,
                expires_at=self._now + self._ttl,
                entries=tuple(pending),
            )
        ]

    def _challenge(
        self,
        pn_id: str,
        entry: SetupEntry,
        entity: EntityRecord,
        gateway_eukey: bytes,
        est_id: bytes,
        rand_server: bytes,
    ) -> tuple[AuthChallenge, PendingPNE]:
        assert entity.eukey is not None
        flow = self._flow(entity)
        assert flow is not None
        local = sealed_gw = sealed_pne = None
        if entry.local_eukey:
            # 002 §7.5.4.3: a distinct LocalEUKey per PNE, one copy under each EUKey.
            local = self._rng.token_bytes(32)
            sealed_pne, sealed_gw = (
                seal_local_eukey(
                    holder_key,
                    local,
                    server_id=self._server_id,
                    gw_id=self._requester,
                    pne_id=entry.pne_id,
                    pn_id=pn_id,
                    est_id=est_id,
                    holder_id=holder,
                    nonce=self._rng.token_bytes(NONCE_LEN),
                )
                for holder_key, holder in (
                    (entity.eukey, entry.pne_id),
                    (gateway_eukey, self._requester),
                )
            )
        an = tk_step = key_index = None
        if flow is AuthFlow.TK:
            held = self._lookups.get_tk_state(entry.pne_id)
            assert held is not None
            tk, step = held
            run = _tk_run(
                pn_id,
                self._requester,
                self._server_id,
                entry.pne_id,
                est_id,
                entry.rand_pne,
                rand_server,
            )
            ch = tk_auth.server_challenge(tk=tk, tk_step=step, key_index=entity.key_index, run=run)
            an, tk_step, key_index = ch.an, ch.tk_step, ch.key_index
        return (
            AuthChallenge(
                pne_id=entry.pne_id,
                status=_OK,
                flow=flow,
                sealed_local_gw=sealed_gw,
                sealed_local_pne=sealed_pne,
                an=an,
                tk_step=tk_step,
                key_index=key_index,
            ),
            PendingPNE(
                pne_id=entry.pne_id,
                rand_pne=entry.rand_pne,
                status=_OK,
                flow=flow,
                local_eukey=local,
                tk_step=tk_step,
                key_index=key_index,
            ),
        )

    TRANSITIONS = MappingProxyType(
        {
            (ServerSetupState.EXPECT_REQUEST, PNEstablishRequest): (
                _on_request,
                ServerSetupState.DONE,
            )
        }
    )


def _tk_run(
    pn_id: str,
    gw_id: str,
    server_id: str,
    pne_id: str,
    est_id: bytes,
    rand_pne: bytes,
    rand_server: bytes,
) -> tk_auth.TKRun:
    return tk_auth.TKRun(
        pn_id=pn_id,
        gw_id=gw_id,
        server_id=server_id,
        pne_id=pne_id,
        est_id=est_id,
        rand_pne=rand_pne,
        rand_server=rand_server,
    )


# -- CPNS Server, second half: AUTHENTICATE Response -> SETUP Response ------------------------


class ServerCompletionState(Enum):
    """States of :class:`ServerCompletion`."""

    EXPECT_RESPONSE = auto()
    DONE = auto()
    FAILED = auto()


class ServerCompletion(Machine[ServerCompletionState]):
    """CPNS Server on the PN GW's AUTHENTICATE Response (002 §7.5.4.3, 000 §7.5.3), built
    from the stored pending establishment (None when the store has none for this PN GW
    and est_id). Any server process can run it."""

    HOP: ClassVar[str] = "server"

    def __init__(
        self,
        *,
        server_id: str,
        requester: str,
        pending: EstablishmentPending | None,
        lookups: EstablishmentLookups,
        now: int,
    ) -> None:
        super().__init__(
            ServerCompletionState.EXPECT_RESPONSE,
            done=ServerCompletionState.DONE,
            failed=ServerCompletionState.FAILED,
        )
        self._server_id = server_id
        self._requester = requester
        self._pending = pending
        self._lookups = lookups
        self._now = now

    def _failure_reply(self, incoming: Message | None, code: ErrorCode) -> Message | None:
        if not isinstance(incoming, AuthenticateResponse):
            return None
        return PNEstablishResponse(
            txid=incoming.txid,
            src=self._server_id,
            dst=incoming.src,
            pn_id=incoming.pn_id,
            status=code,
            est_id=incoming.est_id,
            entries=(),
        )

    def _on_response(self, message: Message) -> list[Event]:
        assert isinstance(message, AuthenticateResponse)
        check_addressed(message, to=self._server_id, sender=self._requester)
        p = self._pending
        if (
            p is None
            or p.est_id != message.est_id
            or p.gw_id != self._requester
            or self._now > p.expires_at
        ):
            raise RemoteProtocolError(
                "no pending establishment with this ID", code=ErrorCode.UNKNOWN_ESTABLISHMENT
            )
        gateway = self._lookups.get_entity(self._requester)
        proofs: dict[str, AuthProof] = {}
        for proof in message.entries:
            proofs.setdefault(proof.pne_id, proof)
        events: list[Event] = []
        results: list[PNEResult] = []
        wire: list[AuthResult] = []
        for entry in p.entries:
            result, extra = self._verify(p, entry, proofs.get(entry.pne_id))
            results.append(result[0])
            wire.append(result[1])
            events += extra
        joined = any(r.joined for r in results)
        self._send(
            PNEstablishResponse(
                txid=message.txid,
                src=self._server_id,
                dst=message.src,
                pn_id=p.pn_id,
                status=_OK if joined else _AF,
                est_id=p.est_id,
                entries=tuple(wire),
            )
        )
        events.append(
            PNEstablished(
                pn_id=p.pn_id,
                gw_id=p.gw_id,
                owner=gateway.owner if gateway is not None else "",
                est_id=p.est_id,
                at=self._now,
                results=tuple(results),
            )
        )
        return events

    def _verify(
        self, p: EstablishmentPending, entry: PendingPNE, proof: AuthProof | None
    ) -> tuple[tuple[PNEResult, AuthResult], list[Event]]:
        """One PNE's proof, checked alone; any failure is that PNE's only."""
        flow = entry.flow
        events: list[Event] = []
        status, reassign = entry.status, False
        sk = hash_server = confirm = None
        if status is _OK:
            entity = self._lookups.get_entity(entry.pne_id)
            if proof is None:
                status = _AF
            elif proof.status is not _OK:
                status = _verdict(proof.status)
                # A PN GW's (or PNE's) STALE_CREDENTIAL asks for a 003 re-assignment only
                # when this challenge is still the current one: a challenge superseded by
                # another run (an overlapping establishment moved the TK) is merely late.
                reassign = status is ErrorCode.STALE_CREDENTIAL and not self._superseded(
                    entry, entity
                )
            elif entity is None or entity.eukey is None:
                status = ErrorCode.UNKNOWN_ENTITY
            elif entity.revoked:
                status = ErrorCode.ENTITY_REVOKED
            elif flow is AuthFlow.RAND_HASH:
                try:
                    if proof.hash_pne is None:
                        raise AuthenticationFailed("no hash_PNE")
                    verdict = verify_proof(
                        entity.eukey,
                        ctx=_ctx(p.pn_id, p.gw_id, self._server_id, entry.pne_id),
                        rand_pne=entry.rand_pne,
                        rand_server=p.rand_server,
                        hash_pne_value=proof.hash_pne,
                        labels=ESTABLISHMENT,
                    )
                    sk, hash_server = verdict.sk, verdict.hash_server
                except AuthenticationFailed:
                    status = _AF
            elif flow is AuthFlow.TK:
                status, reassign, sk, confirm, events = self._verify_tk(p, entry, entity, proof)
            else:  # pragma: no cover - the setup half chooses RAND_HASH or TK only
                status = _AF
        result = PNEResult(
            pne_id=entry.pne_id,
            status=status,
            flow=flow,
            reassign=reassign,
            sk=sk if status is _OK else None,
        )
        wire = AuthResult(
            pne_id=entry.pne_id,
            status=status,
            flow=flow,
            hash_server=hash_server if status is _OK else None,
            confirm=confirm if status is _OK else None,
            reassign=reassign,
        )
        return (result, wire), events

    def _superseded(self, entry: PendingPNE, entity: EntityRecord | None) -> bool:
        """Whether the stored TK state moved past this TK challenge since it was made."""
        if entry.flow is not AuthFlow.TK or entity is None or entry.tk_step is None:
            return False
        held = self._lookups.get_tk_state(entry.pne_id)
        return held is not None and (held[1] > entry.tk_step or entity.key_index != entry.key_index)

    def _verify_tk(
        self, p: EstablishmentPending, entry: PendingPNE, entity: EntityRecord, proof: AuthProof
    ) -> tuple[ErrorCode, bool, bytes | None, bytes | None, list[Event]]:
        held = self._lookups.get_tk_state(entry.pne_id)
        if (
            held is None
            or entry.tk_step is None
            or entry.key_index is None
            or proof.sealed_eukey is None
            or proof.key_index is None
            or proof.tk_step != entry.tk_step
        ):
            return _AF, False, None, None, []
        tk, step = held
        run = _tk_run(
            p.pn_id, p.gw_id, self._server_id, entry.pne_id, p.est_id, entry.rand_pne, p.rand_server
        )
        try:
            verified = tk_auth.server_verify(
                tk=tk,
                tk_step=step,
                eukeys=entity.eukeys,
                key_index=entity.key_index,
                run=run,
                challenge_step=entry.tk_step,
                challenge_index=entry.key_index,
                sealed_eukey=proof.sealed_eukey,
                proof_index=proof.key_index,
            )
        except tk_auth.StaleCredential as exc:
            return ErrorCode.STALE_CREDENTIAL, exc.reassign, None, None, []
        except AuthenticationFailed:
            return _AF, False, None, None, []
        advanced = TKAdvanced(
            pne_id=entry.pne_id,
            tk=verified.tk,
            tk_step=verified.tk_step,
            expected_step=step,
            key_index=verified.key_index,
            expected_index=entity.key_index,
        )
        return _OK, verified.reassign, verified.sk, verified.confirm, [advanced]

    TRANSITIONS = MappingProxyType(
        {
            (ServerCompletionState.EXPECT_RESPONSE, AuthenticateResponse): (
                _on_response,
                ServerCompletionState.DONE,
            )
        }
    )


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

        A PAN message that does not fit the current state (a retransmitted SETUP Request,
        a late answer, a message of another transaction) is ignored rather than failing
        the whole establishment: one PNE cannot end the establishment of the others. Only
        the server's messages, and the originator's first one, follow the table strictly.
        """
        self._check_live()
        if (
            (self._state, type(message)) not in self.TRANSITIONS
            and message.src != self._server_id
            and self._setup is not None
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


# -- PNE: originating and invited ------------------------------------------------------------


class PNEState(Enum):
    """States of :class:`OriginatingPNE` and :class:`InvitedPNE`."""

    START = auto()
    EXPECT_INVITE = auto()
    EXPECT_AUTHENTICATE_REQUEST = auto()
    EXPECT_RESULT = auto()
    DONE = auto()
    FAILED = auto()


class _PNEBase(Machine[PNEState]):
    """What both PNE roles do on the AUTHENTICATE Request and on the final message."""

    HOP: ClassVar[str] = "device"
    #: The final message of the role (SETUP Response or PNEstablishmentNotify).
    RESULT: ClassVar[type[Message]]

    def __init__(
        self,
        initial: PNEState,
        *,
        pne_id: str,
        gw_id: str,
        server_id: str,
        eukey: bytes | None,
        tk_state: tk_auth.PNETKState | None,
        rng: Random,
        tk_lookup: Callable[[], tk_auth.PNETKState | None] | None = None,
    ) -> None:
        super().__init__(initial, done=PNEState.DONE, failed=PNEState.FAILED)
        self._pne_id = pne_id
        self._gw_id = gw_id
        self._server_id = server_id
        self._eukey = eukey
        self._tk_state = tk_state
        self._tk_lookup = tk_lookup
        self._rng = rng
        self._pn_id: str | None = None
        self._rand_pne: bytes | None = None
        self._local_wanted = False
        self._request: PNEAuthenticateRequest | None = None
        self._response: PNEAuthenticateResponse | None = None
        self._responder: RandHashResponder | None = None
        self._tk_answer: tk_auth.PNEAnswer | None = None
        self._tk_run: tk_auth.TKRun | None = None

    def _failure_reply(self, incoming: Message | None, code: ErrorCode) -> Message | None:
        if isinstance(incoming, PNEAuthenticateRequest):
            return PNEAuthenticateResponse(
                txid=incoming.txid,
                src=self._pne_id,
                dst=incoming.src,
                flow=incoming.flow,
                est_id=incoming.est_id,
                status=code,
            )
        return None

    def _current_tk(self) -> tk_auth.PNETKState | None:
        """The TK state to move from: as stored now when the machine reads it through
        ``tk_lookup`` (another establishment of this PNE may have moved it since this
        machine was built; answering or confirming from an older copy would take the
        stored state back, losing a pending EUKey), else the machine's own copy."""
        return self._tk_lookup() if self._tk_lookup is not None else self._tk_state

    def _on_authenticate(self, message: Message) -> list[Event]:
        """002 §7.5.4.1 (rand/hash) or 000 §7.5.1 (TK): answer, open the LocalEUKey copy."""
        assert isinstance(message, PNEAuthenticateRequest)
        check_addressed(message, to=self._pne_id, sender=self._gw_id)
        pn_id, rand_pne = self._pn_id, self._rand_pne
        assert pn_id is not None
        assert rand_pne is not None
        events: list[Event] = []
        if message.auth_flow is AuthFlow.RAND_HASH and self._eukey is not None:
            self._responder = RandHashResponder(
                key=self._eukey,
                ctx=_ctx(pn_id, self._gw_id, self._server_id, self._pne_id),
                rand_pne=rand_pne,
                labels=ESTABLISHMENT,
            )
            proof: dict[str, Any] = {"hash_pne": self._responder.answer(message.rand_server)}
            key = self._eukey
        elif message.auth_flow is AuthFlow.TK and (tk_state := self._current_tk()) is not None:
            if message.an is None or message.tk_step is None or message.key_index is None:
                raise AuthenticationFailed("TK challenge without AN, step or index")
            run = _tk_run(
                pn_id,
                self._gw_id,
                self._server_id,
                self._pne_id,
                message.est_id,
                rand_pne,
                message.rand_server,
            )
            answer = tk_auth.pne_answer(
                tk_state,
                run=run,
                challenge=tk_auth.TKChallenge(
                    tk_step=message.tk_step, key_index=message.key_index, an=message.an
                ),
                sealed_next=message.sealed_next_eukey,
                nonce=self._rng.token_bytes(NONCE_LEN),
            )
            self._tk_run, self._tk_answer, self._tk_state = run, answer, answer.state
            events.append(PNETKUpdated(state=answer.state))
            proof = {
                "sealed_eukey": answer.sealed_eukey,
                "key_index": answer.key_index,
                "tk_step": answer.tk_step,
            }
            key = answer.state.eukey
        else:
            raise AuthenticationFailed(f"no credential for flow {message.auth_flow.name}")
        if message.sealed_local_eukey is not None:
            local = open_local_eukey(
                key,
                message.sealed_local_eukey,
                server_id=self._server_id,
                gw_id=self._gw_id,
                pne_id=self._pne_id,
                pn_id=pn_id,
                est_id=message.est_id,
                holder_id=self._pne_id,
            )
            events.append(
                LocalEUKeyStored(
                    pne_id=self._pne_id,
                    gw_id=self._gw_id,
                    pn_id=pn_id,
                    est_id=message.est_id,
                    local_eukey=local,
                )
            )
        self._request = message
        self._response = PNEAuthenticateResponse(
            txid=message.txid,
            src=self._pne_id,
            dst=message.src,
            flow=message.flow,
            est_id=message.est_id,
            status=_OK,
            **proof,
        )
        self._send(self._response)
        return events

    def _on_retry(self, message: Message) -> list[Event]:
        """The same AUTHENTICATE Request again (our answer was lost): the same answer."""
        if message != self._request or self._response is None:
            raise UnexpectedMessage("a second AUTHENTICATE Request in one establishment")
        self._send(self._response)
        return []

    def _on_early_result(self, message: Message) -> list[Event]:
        """The establishment ended before this PNE was challenged (a refusal)."""
        status = getattr(message, "status", _AF)
        raise RemoteProtocolError(
            f"refused before authentication: {ErrorCode(status).name}",
            code=status if status is not _OK else ErrorCode.UNEXPECTED_MESSAGE,
        )

    def _check_result(self, message: Message) -> list[Event]:
        """002 §7.5.4.1 last paragraph: verify hash_server (TK: the key confirmation)."""
        assert isinstance(message, PNSetupResponse | PNEstablishmentNotify)
        request = self._request
        assert request is not None
        assert self._pn_id is not None
        if message.status is not _OK:
            raise RemoteProtocolError(f"not a member: {message.status.name}", code=message.status)
        if message.est_id != request.est_id:
            raise UnexpectedMessage("result of another establishment")
        events: list[Event] = []
        if self._responder is not None:
            if message.hash_server is None:
                raise AuthenticationFailed("no hash_server")
            sk = self._responder.accept(message.hash_server)
        else:
            answer, run, state = self._tk_answer, self._tk_run, self._current_tk()
            assert answer is not None
            assert run is not None
            assert state is not None
            if message.confirm is None:
                raise AuthenticationFailed("no key confirmation")
            self._tk_state = tk_auth.pne_confirmed(
                state, run=run, answer=answer, confirm=message.confirm
            )
            events.append(PNETKUpdated(state=self._tk_state))
            sk = answer.sk
        members = message.members if isinstance(message, PNSetupResponse) else ()
        events.append(
            PNEJoined(
                pn_id=self._pn_id,
                gw_id=self._gw_id,
                est_id=request.est_id,
                flow=request.auth_flow,
                sk=sk,
                members=members,
            )
        )
        return events


class OriginatingPNE(_PNEBase):
    """The originating PNE (002 §7.5.4.1): :meth:`start` sends the SETUP Request.

    ``eukey`` is its EUKey (rand/hash flow, enrolled with UI), ``tk_state`` its TK-flow
    state (003 chain); either may be None. ``server_id`` is the CPNS Server it trusts.
    ``tk_lookup``, if given, reads the PNE's stored TK state when the machine answers or
    confirms (instead of ``tk_state``): a device that runs more than one establishment at
    a time must give it, so that no machine moves the stored state back.
    """

    RESULT: ClassVar[type[Message]] = PNSetupResponse

    def __init__(
        self,
        *,
        pne_id: str,
        gw_id: str,
        server_id: str,
        eukey: bytes | None,
        tk_state: tk_auth.PNETKState | None,
        rng: Random,
        tk_lookup: Callable[[], tk_auth.PNETKState | None] | None = None,
    ) -> None:
        super().__init__(
            PNEState.START,
            pne_id=pne_id,
            gw_id=gw_id,
            server_id=server_id,
            eukey=eukey,
            tk_state=tk_state,
            rng=rng,
            tk_lookup=tk_lookup,
        )
        self._setup: PNSetupRequest | None = None

    @property
    def request(self) -> PNSetupRequest | None:
        """The SETUP Request sent (to resend unchanged)."""
        return self._setup

    def start(
        self,
        *,
        pn_id: str,
        invite: Sequence[str] = (),
        local_eukey: bool = False,
        flow: bytes | None = None,
    ) -> None:
        """Queue the SETUP Request: rand_PNE, the LocalEUKey need, the invited PNEs."""
        if self._state is not PNEState.START:
            raise LocalProtocolError("start() only once, on a new machine")
        self._pn_id, self._local_wanted = pn_id, local_eukey
        self._rand_pne = self._rng.token_bytes(32)
        self._setup = PNSetupRequest(
            txid=self._rng.token_bytes(TXID_LEN),
            src=self._pne_id,
            dst=self._gw_id,
            pn_id=pn_id,
            flow=flow,
            rand_pne=self._rand_pne,
            local_eukey=local_eukey,
            invite=tuple(invite),
        )
        self._send(self._setup)
        self._state = PNEState.EXPECT_AUTHENTICATE_REQUEST

    def _on_setup_response(self, message: Message) -> list[Event]:
        assert isinstance(message, PNSetupResponse)
        assert self._setup is not None
        check_reply_to(message, self._setup)
        return self._check_result(message)

    def _on_early_setup_response(self, message: Message) -> list[Event]:
        assert isinstance(message, PNSetupResponse)
        assert self._setup is not None
        check_reply_to(message, self._setup)
        return self._on_early_result(message)

    TRANSITIONS = MappingProxyType(
        {
            (PNEState.EXPECT_AUTHENTICATE_REQUEST, PNEAuthenticateRequest): (
                _PNEBase._on_authenticate,
                PNEState.EXPECT_RESULT,
            ),
            (PNEState.EXPECT_AUTHENTICATE_REQUEST, PNSetupResponse): (
                _on_early_setup_response,
                PNEState.FAILED,
            ),
            (PNEState.EXPECT_RESULT, PNEAuthenticateRequest): (
                _PNEBase._on_retry,
                PNEState.EXPECT_RESULT,
            ),
            (PNEState.EXPECT_RESULT, PNSetupResponse): (_on_setup_response, PNEState.DONE),
        }
    )


class InvitedPNE(_PNEBase):
    """An invited PNE (002 §7.5.4.1): answers the PN GW's invitation with its SETUP
    Response, then the AUTHENTICATE Request, then checks its PNEstablishmentNotify."""

    RESULT: ClassVar[type[Message]] = PNEstablishmentNotify

    def __init__(
        self,
        *,
        pne_id: str,
        gw_id: str,
        server_id: str,
        eukey: bytes | None,
        tk_state: tk_auth.PNETKState | None,
        rng: Random,
        local_eukey: bool = False,
        tk_lookup: Callable[[], tk_auth.PNETKState | None] | None = None,
    ) -> None:
        super().__init__(
            PNEState.EXPECT_INVITE,
            pne_id=pne_id,
            gw_id=gw_id,
            server_id=server_id,
            eukey=eukey,
            tk_state=tk_state,
            rng=rng,
            tk_lookup=tk_lookup,
        )
        self._local_wanted = local_eukey
        self._invite: PNInvite | None = None
        self._invite_response: PNInviteResponse | None = None

    def _failure_reply(self, incoming: Message | None, code: ErrorCode) -> Message | None:
        if isinstance(incoming, PNInvite):
            return PNInviteResponse(
                txid=incoming.txid,
                src=self._pne_id,
                dst=incoming.src,
                flow=incoming.flow,
                status=code,
                local_eukey=False,
            )
        return super()._failure_reply(incoming, code)

    def _on_invite(self, message: Message) -> list[Event]:
        assert isinstance(message, PNInvite)
        assert message.pn_id is not None
        check_addressed(message, to=self._pne_id, sender=self._gw_id)
        if self._eukey is None and self._current_tk() is None:
            raise RemoteProtocolError("no credential to join with", code=ErrorCode.UNKNOWN_ENTITY)
        self._invite, self._pn_id = message, message.pn_id
        self._rand_pne = self._rng.token_bytes(32)
        self._invite_response = PNInviteResponse(
            txid=message.txid,
            src=self._pne_id,
            dst=message.src,
            pn_id=message.pn_id,
            flow=message.flow,
            status=_OK,
            rand_pne=self._rand_pne,
            local_eukey=self._local_wanted,
        )
        self._send(self._invite_response)
        return []

    def _on_invite_retry(self, message: Message) -> list[Event]:
        if message != self._invite or self._invite_response is None:
            raise UnexpectedMessage("a second invitation")
        self._send(self._invite_response)
        return []

    def _on_notify(self, message: Message) -> list[Event]:
        assert isinstance(message, PNEstablishmentNotify)
        assert self._invite is not None
        _check_notify(message, self._invite)
        return self._check_result(message)

    def _on_early_notify(self, message: Message) -> list[Event]:
        assert isinstance(message, PNEstablishmentNotify)
        assert self._invite is not None
        _check_notify(message, self._invite)
        return self._on_early_result(message)

    TRANSITIONS = MappingProxyType(
        {
            (PNEState.EXPECT_INVITE, PNInvite): (_on_invite, PNEState.EXPECT_AUTHENTICATE_REQUEST),
            (PNEState.EXPECT_AUTHENTICATE_REQUEST, PNInvite): (
                _on_invite_retry,
                PNEState.EXPECT_AUTHENTICATE_REQUEST,
            ),
            (PNEState.EXPECT_AUTHENTICATE_REQUEST, PNEAuthenticateRequest): (
                _PNEBase._on_authenticate,
                PNEState.EXPECT_RESULT,
            ),
            (PNEState.EXPECT_AUTHENTICATE_REQUEST, PNEstablishmentNotify): (
                _on_early_notify,
                PNEState.FAILED,
            ),
            (PNEState.EXPECT_RESULT, PNEAuthenticateRequest): (
                _PNEBase._on_retry,
                PNEState.EXPECT_RESULT,
            ),
            (PNEState.EXPECT_RESULT, PNEstablishmentNotify): (_on_notify, PNEState.DONE),
        }
    )


def _check_notify(message: PNEstablishmentNotify, invite: PNInvite) -> None:
    """The notification answers our invitation: same transaction, from the PN GW."""
    if message.txid != invite.txid or message.src != invite.src or message.dst != invite.dst:
        raise RemoteProtocolError(
            "notification does not match the invitation", code=ErrorCode.UNEXPECTED_MESSAGE
        )
