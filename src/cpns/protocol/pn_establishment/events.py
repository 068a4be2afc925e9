"""PN Establishment: the facts each role reports (events), the records they carry, and
the helpers the roles share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from cpns.errors import ErrorCode
from cpns.messages.constants import AuthFlow
from cpns.messages.model import MemberStatus
from cpns.protocol import tk_auth
from cpns.protocol._machine import Event
from cpns.protocol.pne_auth import AuthContext
from cpns.records import (
    FLOW_NONE,
    FLOW_RAND_HASH,
    FLOW_TK,
    MEMBER,
    PendingEntry,
    PendingEstablishment,
    PNMember,
)

__all__ = [
    "EstablishmentFinished",
    "EstablishmentPending",
    "GatewayTKHolding",
    "GatewayTKUpdated",
    "LocalEUKeyStored",
    "PENDING_TTL",
    "PNEJoined",
    "PNEResult",
    "PNETKUpdated",
    "PNEstablished",
    "PendingPNE",
    "ReassignmentRequested",
    "TKAdvanced",
    "flow_from_name",
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


#: How the store and the PN inventory write a flow (cpns.records.FLOW_*).
_FLOW_NAMES: Final = {AuthFlow.RAND_HASH: FLOW_RAND_HASH, AuthFlow.TK: FLOW_TK}


def flow_name(flow: AuthFlow | None) -> str:
    """The flow as the store and the PN inventory write it: "rand-hash", "tk", or "" (none
    chosen: the PNE was refused first)."""
    return _FLOW_NAMES[flow] if flow is not None else FLOW_NONE


def flow_from_name(name: str) -> AuthFlow | None:
    """The inverse of :func:`flow_name`; ValueError for a name the store never writes."""
    for flow, text in _FLOW_NAMES.items():
        if text == name:
            return flow
    if name == FLOW_NONE:
        return None
    raise ValueError(f"unknown flow {name!r}")


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

    def to_record(self) -> PendingEstablishment:
        """The store's record of this pending establishment."""
        return PendingEstablishment(
            gw_id=self.gw_id,
            est_id=self.est_id,
            pn_id=self.pn_id,
            rand_server=self.rand_server,
            created_at=self.created_at,
            expires_at=self.expires_at,
            entries=tuple(
                PendingEntry(
                    pne_id=e.pne_id,
                    rand_pne=e.rand_pne,
                    flow=flow_name(e.flow),
                    local_eukey=e.local_eukey,
                    tk_step=e.tk_step,
                    key_index=e.key_index,
                    status=e.status.name,
                )
                for e in self.entries
            ),
        )

    @classmethod
    def from_record(cls, record: PendingEstablishment) -> EstablishmentPending:
        """Back from the store's record (what :class:`ServerCompletion` is built from).

        Raises: ValueError: a flow or status name this code does not know.
        """
        return cls(
            gw_id=record.gw_id,
            est_id=record.est_id,
            pn_id=record.pn_id,
            rand_server=record.rand_server,
            created_at=record.created_at,
            expires_at=record.expires_at,
            entries=tuple(
                PendingPNE(
                    pne_id=e.pne_id,
                    rand_pne=e.rand_pne,
                    status=ErrorCode[e.status],
                    flow=flow_from_name(e.flow),
                    local_eukey=e.local_eukey,
                    tk_step=e.tk_step,
                    key_index=e.key_index,
                )
                for e in record.entries
            ),
        )


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

    def members(self) -> tuple[PNMember, ...]:
        """The results as the PN inventory records them (``WriteTx.record_pn``): status
        "member" for a PNE that joined, else its ErrorCode name."""
        return tuple(
            PNMember(
                pne_id=r.pne_id,
                flow=flow_name(r.flow),
                status=MEMBER if r.joined else r.status.name,
                at=self.at,
            )
            for r in self.results
        )


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
