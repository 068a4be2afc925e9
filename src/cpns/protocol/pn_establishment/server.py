"""PN Establishment, CPNS Server role: the two halves (002 §7.5.4.3, 000 §7.5.3)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from types import MappingProxyType
from typing import ClassVar

from cpns.crypto.keywrap import NONCE_LEN
from cpns.errors import (
    AuthenticationFailed,
    ErrorCode,
    RemoteProtocolError,
)
from cpns.messages.constants import EST_ID_LEN, AuthFlow
from cpns.messages.model import (
    AuthChallenge,
    AuthenticateRequest,
    AuthenticateResponse,
    AuthProof,
    AuthResult,
    Message,
    PNEstablishRequest,
    PNEstablishResponse,
    SetupEntry,
)
from cpns.protocol import tk_auth
from cpns.protocol._checks import check_addressed
from cpns.protocol._machine import Event, Machine
from cpns.protocol.pn_establishment.events import (
    _AF,
    _OK,
    PENDING_TTL,
    EstablishmentPending,
    PendingPNE,
    PNEResult,
    PNEstablished,
    TKAdvanced,
    _ctx,
    _tk_run,
    _verdict,
)
from cpns.protocol.pne_auth import (
    ESTABLISHMENT,
    seal_local_eukey,
    verify_proof,
)
from cpns.records import EntityRecord
from cpns.types import EntityKind, Random

__all__ = [
    "EstablishmentLookups",
    "ServerCompletion",
    "ServerCompletionState",
    "ServerSetup",
    "ServerSetupState",
]


# -- CPNS Server, first half: SETUP Request -> AUTHENTICATE Request ---------------------------


@dataclass(frozen=True, slots=True)
class EstablishmentLookups:
    """Synchronous reads the server roles need (injected; the store provides them)."""

    #: Entity by Entity ID.
    get_entity: Callable[[str], EntityRecord | None]
    #: A PNE's TK state (TK_s, s), or None without TK record.
    get_tk_state: Callable[[str], tuple[bytes, int] | None]
    #: The CPNS User owning the PN ``pn_id`` in the inventory, or None if there is no such
    #: PN yet (a PN ID is one user's: another user's PN GW cannot take it over).
    get_pn_owner: Callable[[str], str | None] = field(default=lambda _pn_id: None)


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


def _check_pn_owner(lookups: EstablishmentLookups, pn_id: str, owner: str) -> None:
    """A PN ID already in the inventory belongs to its user: POLICY_DENIED for another's."""
    known = lookups.get_pn_owner(pn_id)
    if known is not None and known != owner:
        raise RemoteProtocolError(
            "the PN ID belongs to another user's PN", code=ErrorCode.POLICY_DENIED
        )


@dataclass(frozen=True, slots=True)
class _Credential:
    """What the server holds for an admitted PNE: its record, flow and TK state (TK)."""

    entity: EntityRecord
    flow: AuthFlow
    tk: tuple[bytes, int] | None = field(repr=False)


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

    def _admit(
        self, entry: SetupEntry, gateway: EntityRecord, seen: set[str]
    ) -> tuple[ErrorCode, _Credential | None]:
        """Why this PNE cannot take part, or OK and its credential (one read of the entity
        and of its TK record per PNE); 002 §7.5.4.3 and our policy (docs/wire.md 3.4)."""
        if entry.pne_id in seen:
            return ErrorCode.DUPLICATE_PNE, None
        entity = self._lookups.get_entity(entry.pne_id)
        if entity is None:
            return ErrorCode.UNKNOWN_ENTITY, None
        if entity.kind is not EntityKind.PNE:
            return ErrorCode.WRONG_ENTITY_KIND, None
        if entity.owner != gateway.owner:
            return ErrorCode.POLICY_DENIED, None
        if entity.revoked:
            return ErrorCode.ENTITY_REVOKED, None
        if entity.eukey is None:
            return ErrorCode.UNKNOWN_ENTITY, None
        # TK for a chain assigned through a PN GW (003) with a TK record; rand/hash for an
        # EUKey enrolled with UI (004); a 003 chain without TK record is no credential.
        if entity.assigned_via is None:
            return _OK, _Credential(entity=entity, flow=AuthFlow.RAND_HASH, tk=None)
        held = self._lookups.get_tk_state(entity.entity_id)
        if held is None:
            return ErrorCode.UNKNOWN_ENTITY, None
        return _OK, _Credential(entity=entity, flow=AuthFlow.TK, tk=held)

    def _on_request(self, message: Message) -> list[Event]:
        assert isinstance(message, PNEstablishRequest)
        assert message.pn_id is not None  # PN_ID_REQUIRED
        check_addressed(message, to=self._server_id, sender=self._requester)
        gateway = _requesting_gateway(self._lookups, self._requester)
        assert gateway.eukey is not None
        _check_pn_owner(self._lookups, message.pn_id, gateway.owner)
        est_id = self._rng.token_bytes(EST_ID_LEN)
        rand_server = self._rng.token_bytes(32)
        seen: set[str] = set()
        challenges: list[AuthChallenge] = []
        pending: list[PendingPNE] = []
        for entry in message.entries:
            status, credential = self._admit(entry, gateway, seen)
            if status is ErrorCode.DUPLICATE_PNE:
                challenges.append(AuthChallenge(pne_id=entry.pne_id, status=status))
                continue
            seen.add(entry.pne_id)
            if credential is None:
                challenges.append(AuthChallenge(pne_id=entry.pne_id, status=status))
                pending.append(
                    PendingPNE(pne_id=entry.pne_id, rand_pne=entry.rand_pne, status=status)
                )
                continue
            challenge, record = self._challenge(
                message.pn_id, entry, credential, gateway.eukey, est_id, rand_server
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
        credential: _Credential,
        gateway_eukey: bytes,
        est_id: bytes,
        rand_server: bytes,
    ) -> tuple[AuthChallenge, PendingPNE]:
        entity, flow = credential.entity, credential.flow
        assert entity.eukey is not None
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
        if credential.tk is not None:
            tk, step = credential.tk
            run = _tk_run(
                pn_id,
                self._requester,
                self._server_id,
                entry.pne_id,
                est_id,
                entry.rand_pne,
                rand_server,
            )
            ch = tk_auth.server_challenge(
                tk=tk,
                tk_step=step,
                key_index=entity.key_index,
                chain_length=len(entity.eukeys),
                run=run,
            )
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
            # A header PN ID, when present, must be the establishment's: a response that
            # names another PN is not an answer to this establishment.
            or (message.pn_id is not None and message.pn_id != p.pn_id)
        ):
            raise RemoteProtocolError(
                "no pending establishment with this ID", code=ErrorCode.UNKNOWN_ESTABLISHMENT
            )
        gateway = self._lookups.get_entity(self._requester)
        if gateway is not None:  # another user's PN may have taken the PN ID meanwhile
            _check_pn_owner(self._lookups, p.pn_id, gateway.owner)
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
