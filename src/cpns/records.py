"""The records the server keeps about users and entities (plain data, no I/O).

They live outside :mod:`cpns.store` so that the sans-I/O core can read them (the server
state machines receive them through injected lookups) without depending on persistence.
:mod:`cpns.store.base` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from cpns.types import EntityKind

__all__ = [
    "FLOW_NONE",
    "FLOW_RAND_HASH",
    "FLOW_TK",
    "MEMBER",
    "AuditEvent",
    "EntityRecord",
    "PNMember",
    "PNRecord",
    "PendingEntry",
    "PendingEstablishment",
    "StoredReply",
    "TKRecord",
    "UserRecord",
]

#: Flow of a PNE in a PN Establishment: rand/hash mutual authentication (002 §7.5.4).
FLOW_RAND_HASH: Final = "rand-hash"
#: Flow of a PNE in a PN Establishment: TK-based mutual authentication (000 §7.5.1-7.5.3).
FLOW_TK: Final = "tk"
#: No flow: the server refused the PNE before choosing one (unknown, revoked, another
#: user's, listed twice).
FLOW_NONE: Final = ""
#: :attr:`PNMember.status` of a PNE that joined the PN; any other status is the ErrorCode
#: name of its failure.
MEMBER: Final = "member"


@dataclass(frozen=True, slots=True, kw_only=True)
class UserRecord:
    """A CPNS User."""

    #: CPNS User ID.
    user_id: str
    #: Hash(Password) of 003: the scrypt password key (cpns.crypto.kdf.password_key).
    password_key: bytes = field(repr=False)
    #: Creation time, epoch seconds.
    created_at: int
    #: A disabled user cannot obtain keys.
    disabled: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class EntityRecord:
    """A CPNS Entity known to the server, with its EUKey material (004 §5.x.1).

    For an entity with UI (a PN GW), ``eukeys`` holds the one EUKey assigned to it and
    ``key_index`` is 1. For a PNE without UI (003), ``eukeys`` is the chain
    [EUKey_1..EUKey_n] and ``key_index`` the position in use.
    """

    #: Entity ID.
    entity_id: str
    #: PNE or PN GW.
    kind: EntityKind
    #: User ID of the owning CPNS User.
    owner: str
    #: The EUKey (set); empty before assignment.
    eukeys: tuple[bytes, ...] = field(default=(), repr=False)
    #: Position of the EUKey in use, 1-based; 0 before assignment.
    key_index: int = 0
    #: Entity ID of the PN GW that obtained the chain (003), if any.
    assigned_via: str | None = None
    #: Epoch seconds of the last assignment; 0 before.
    assigned_at: int = 0
    #: A revoked entity cannot authenticate.
    revoked: bool = False
    #: How many times the entity was assigned keys (0 before the first assignment); the
    #: 003 Notification carries it so a PNE refuses a superseded one (D-003-11).
    epoch: int = 0

    @property
    def eukey(self) -> bytes | None:
        """The EUKey in use, or None before assignment."""
        if not self.eukeys or not 1 <= self.key_index <= len(self.eukeys):
            return None
        return self.eukeys[self.key_index - 1]


@dataclass(frozen=True, slots=True, kw_only=True)
class TKRecord:
    """A manufacturer Temporary Key record (003 §7.4.2.2 condition 2)."""

    #: PNE Entity ID.
    entity_id: str
    #: The Temporary Key (16..64 bytes).
    tk: bytes = field(repr=False)
    #: Free text naming where the record came from (file name, manufacturer).
    source: str = ""
    #: Import time, epoch seconds.
    imported_at: int = 0
    #: Ratchet step of :attr:`tk`: the stored TK is TK_{tk_step} (000, TK ratchet); 0 for
    #: the manufacturer's TK. Advanced by compare and set
    #: (:meth:`cpns.store.base.WriteTx.set_tk_state`).
    tk_step: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredReply:
    """The reply already sent for a transaction, so a retry gets the same bytes."""

    #: Entity ID of the requester (a PN GW).
    requester: str
    #: Transaction ID of the request.
    txid: bytes
    #: SHA-256 of the request bytes, to tell a retry from a forged reuse of the txid.
    request_digest: bytes
    #: The encoded reply (sealed at rest; it carries key material).
    reply: bytes = field(repr=False)
    #: Epoch seconds.
    created_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEvent:
    """One security event (DESIGN §7): who, which entity, which procedure, outcome, hop."""

    #: Epoch seconds.
    at: int
    #: Entity ID or user that acted ("admin" for CLI actions).
    actor: str
    #: Procedure name, e.g. "eukey-assignment-003".
    procedure: str
    #: Outcome: an ErrorCode name ("OK", "WRONG_PASSWORD", ...).
    outcome: str
    #: Entity concerned, if any.
    entity_id: str | None = None
    #: User concerned, if any.
    user_id: str | None = None
    #: Where it was decided: "server", "gateway:<id>", ...
    hop: str = "server"
    #: Correlation ID (transaction ID hex) following the flow across parties.
    correlation_id: str | None = None
    #: Free text detail, never a secret.
    detail: str = ""
    #: How many events this row stands for: unauthenticated refusals are aggregated per
    #: (procedure, outcome, source, user) and written as one row per flush (D-SRV-2).
    count: int = 1
    #: Network source (client address) of an unauthenticated request, if known.
    source: str | None = None
    #: Flow ID (16 hex digits) of the flow the event belongs to, when its message carried
    #: one (docs/logging.md; not a security input). For an aggregated row: the first one's.
    flow_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingEntry:
    """One PNE of a pending PN Establishment, as the server challenged it (002 §7.5.4.2,
    000): what it needs to check that PNE's proof in the AUTHENTICATE Response."""

    #: Entity ID of the PNE.
    pne_id: str
    #: The PNE's rand_PNE from the SETUP Request (32 bytes).
    rand_pne: bytes = field(repr=False)
    #: :data:`FLOW_RAND_HASH` or :data:`FLOW_TK` (:data:`FLOW_NONE` for a refused entry).
    flow: str
    #: The LocalEUKey generated for this PNE, if it asked for one (a secret).
    local_eukey: bytes | None = field(default=None, repr=False)
    #: TK flow: the TK step t the challenge was made at.
    tk_step: int | None = None
    #: TK flow: the EUKey index i the PNE must prove.
    key_index: int | None = None
    #: "OK", or the ErrorCode name the server refused this PNE with at the SETUP Request
    #: (kept so the PN inventory can record the failure when the establishment ends).
    status: str = "OK"


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingEstablishment:
    """The server's state of one PN Establishment between its AUTHENTICATE Request and
    the PN GW's AUTHENTICATE Response; keyed (gw_id, est_id), sealed at rest, so any
    server process (or one restarted) can take the second half."""

    #: Entity ID of the PN GW that sent the SETUP Request.
    gw_id: str
    #: The establishment's name, 16 random bytes chosen by the server.
    est_id: bytes
    #: PN ID of the PN being established.
    pn_id: str
    #: The server's rand_server, one per establishment (32 bytes).
    rand_server: bytes = field(repr=False)
    #: Epoch seconds.
    created_at: int
    #: Epoch seconds after which the establishment is unknown (and purged).
    expires_at: int
    #: One entry per PNE of the SETUP Request, in its order.
    entries: tuple[PendingEntry, ...] = ()

    def expired(self, now: int) -> bool:
        """Whether the establishment is over at ``now`` (``expires_at`` has passed; the
        purge drops it from then on)."""
        return now > self.expires_at

    def entry(self, pne_id: str) -> PendingEntry | None:
        """The entry of ``pne_id``, or None."""
        for e in self.entries:
            if e.pne_id == pne_id:
                return e
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class PNMember:
    """The outcome of one PNE in the latest establishment of a PN that listed it."""

    #: Entity ID of the PNE.
    pne_id: str
    #: :data:`FLOW_RAND_HASH`, :data:`FLOW_TK`, or :data:`FLOW_NONE` if refused before one
    #: was chosen.
    flow: str
    #: :data:`MEMBER` if it joined, else the ErrorCode name of its failure
    #: ("AUTHENTICATION_FAILED", "POLICY_DENIED", ...).
    status: str
    #: Epoch seconds of that outcome.
    at: int

    @property
    def joined(self) -> bool:
        """Whether the PNE is a member of the PN."""
        return self.status == MEMBER


@dataclass(frozen=True, slots=True, kw_only=True)
class PNRecord:
    """A Personal Network in the server's inventory (002 definitions): its PN GW, owner,
    and the outcome of every PNE its establishments listed (members and failures)."""

    #: PN ID.
    pn_id: str
    #: Entity ID of the PN GW that established it (most recently).
    gateway_id: str
    #: User ID of the CPNS User owning the PN GW (and every member).
    owner: str
    #: Epoch seconds of the first establishment.
    created_at: int
    #: Epoch seconds of the latest establishment.
    updated_at: int
    #: Every PNE listed, ordered by Entity ID: members and failures alike (see
    #: :attr:`PNMember.status`); :attr:`joined` and :attr:`failed` split them.
    members: tuple[PNMember, ...] = ()

    @property
    def joined(self) -> tuple[PNMember, ...]:
        """The PNEs that are members."""
        return tuple(m for m in self.members if m.joined)

    @property
    def failed(self) -> tuple[PNMember, ...]:
        """The PNEs whose latest attempt failed (not members)."""
        return tuple(m for m in self.members if not m.joined)
