"""The records the server keeps about users and entities (plain data, no I/O).

They live outside :mod:`cpns.store` so that the sans-I/O core can read them (the server
state machines receive them through injected lookups) without depending on persistence.
:mod:`cpns.store.base` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cpns.types import EntityKind

__all__ = ["AuditEvent", "EntityRecord", "StoredReply", "TKRecord", "UserRecord"]


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
