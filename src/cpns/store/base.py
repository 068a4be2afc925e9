"""The server's persistence contract: record types and the store protocol.

The service layer (``cpns.server.service``) talks to a :class:`ServerStore`; the SQL
implementation lives in :mod:`cpns.store.sql`. Secrets in records are plain bytes in
memory and sealed under the master key at rest (002 §3.2 "Secure Storage"); sealing and
unsealing happen inside the store, never in callers.

Reads may run on any thread. Writes go through :meth:`ServerStore.write`, which runs a
function inside one transaction on the writer thread; several concurrent writes share one
commit (group commit, DESIGN §8), and a write returns only after its commit is durable,
so a reply built from it can be sent (DESIGN §6).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from cpns.errors import StoreError
from cpns.records import (
    AuditEvent,
    EntityRecord,
    PendingEntry,
    PendingEstablishment,
    PNMember,
    PNRecord,
    StoredReply,
    TKRecord,
    UserRecord,
)

__all__ = [
    "AuditEvent",
    "ClaimConflict",
    "ConflictError",
    "EntityRecord",
    "NonceReused",
    "PNMember",
    "PNRecord",
    "PendingEntry",
    "PendingEstablishment",
    "ServerStore",
    "StoredReply",
    "TKRecord",
    "UserRecord",
    "WriteTx",
]


class ConflictError(StoreError):
    """A unique row already exists (user, entity, TK record)."""


class ClaimConflict(ConflictError):
    """A compare and set lost the race: the row changed after its checks (one winner).

    Raised by an assignment, a TK ratchet or EUKey index advance whose expected value is
    no longer the stored one, and by the deletion of a pending establishment that is
    gone (another process finished it, or it expired and was purged). Nothing is written
    by the operation that raises it.
    """


class NonceReused(StoreError):  # contract name; "Reused" already says error
    """A random value (RANDPNGW, rand) was already used: the request is a replay."""


class WriteTx(Protocol):
    """Operations available inside one write transaction."""

    def add_user(self, user: UserRecord) -> None:
        """Insert a user; :class:`ConflictError` if the User ID exists."""
        ...

    def set_password_key(self, user_id: str, password_key: bytes) -> None:
        """Replace a user's password key; StoreError if the user does not exist."""
        ...

    def put_entity(self, entity: EntityRecord) -> None:
        """Insert or replace an entity (by Entity ID)."""
        ...

    def assign_entity(self, entity: EntityRecord, *, expected_epoch: int) -> None:
        """Store an assignment (``entity.epoch == expected_epoch + 1``) if the entity is
        absent or still at ``expected_epoch`` with the same owner and kind and not revoked,
        in one atomic step; :class:`ClaimConflict` (nothing written) otherwise."""
        ...

    def put_tks(self, records: Sequence[TKRecord]) -> None:
        """Insert TK records; :class:`ConflictError` (and nothing written) on a duplicate."""
        ...

    def use_nonce(self, nonce: bytes, *, expires_at: int) -> None:
        """Record a random value as used; :class:`NonceReused` if it already was."""
        ...

    def put_reply(self, reply: StoredReply) -> None:
        """Remember the reply to a transaction."""
        ...

    def audit(self, event: AuditEvent) -> None:
        """Append an audit event."""
        ...

    def audit_many(self, events: Sequence[AuditEvent]) -> None:
        """Append audit events, in order (one batched statement: the per-PNE rows of an
        establishment)."""
        ...

    def set_revoked(self, entity_id: str, revoked: bool) -> None:
        """Revoke or restore an entity; StoreError if it does not exist."""
        ...

    def record_auth_failure(self, user_id: str, *, now: int, window: int, count: int = 1) -> None:
        """Count ``count`` failed password proofs under the counter key ``user_id`` (a
        User ID, a source or both: see :mod:`cpns.server.guard`); the count lives
        ``window`` s after the last failure, then starts again from ``count``."""
        ...

    def purge_audit(self, *, before: int) -> int:
        """Delete audit events older than ``before`` (retention); return how many went."""
        ...

    def clear_auth_failures(self, user_id: str) -> None:
        """Forget the failures of ``user_id`` (after a successful proof)."""
        ...

    def advance_digest_nc(
        self,
        nonce: str,
        *,
        keep_until: int,
        advance: Callable[[tuple[int, int] | None], tuple[int, int]],
    ) -> None:
        """Compare and set of a Digest nonce's counter state (highest nc, window bitmap).

        ``advance`` maps the current state (None if the nonce was never used) to the new
        one, or raises (a replayed ``nc``: nothing is written, the error goes to the
        caller). The read and the write are one atomic step against every other process
        over the same database. The row is purged after ``keep_until``.
        """
        ...

    # -- PN Establishment (002 §7.5.4, 000) ------------------------------------------------

    def put_establishment(self, establishment: PendingEstablishment) -> None:
        """Store the pending state of an establishment (at the AUTHENTICATE Request), its
        secrets sealed at rest; :class:`ConflictError` if (gw_id, est_id) is taken."""
        ...

    def delete_establishment(self, gateway_id: str, est_id: bytes) -> None:
        """Delete a pending establishment (when its PN Establishment Response is
        committed): :class:`ClaimConflict` if it is not there any more (another process
        took it first, or it was purged), so of two processes finishing one establishment
        exactly one commits."""
        ...

    def record_pn(
        self,
        pn_id: str,
        gateway_id: str,
        owner: str,
        now: int,
        results: Sequence[PNMember],
    ) -> None:
        """Upsert the PN ``pn_id`` with the per-PNE results of one establishment (read it
        back with :meth:`ServerStore.get_pn`: the write does not, it runs on every
        establishment).

        A new PN is created at ``now``; a known one gets ``updated_at = now`` and
        ``gateway_id`` (the PN GW that established it last). Each result replaces that
        PNE's previous one (the latest attempt counts): status :data:`~cpns.records.MEMBER`
        makes it a member, any other status (an ErrorCode name) records a failure that is
        not a member. PNEs not in ``results`` keep their rows. :class:`ConflictError`
        (nothing written) if the PN belongs to another owner or ``results`` lists a PNE
        twice; :class:`StoreError` for an unknown flow.
        """
        ...

    def set_tk_state(self, entity_id: str, tk: bytes, tk_step: int, *, expected_step: int) -> None:
        """Compare and set of a PNE's TK ratchet: store TK_{tk_step} if the record is
        still at ``expected_step``; :class:`ClaimConflict` (nothing written) if it is not,
        or if there is no TK record."""
        ...

    def set_key_index(self, entity_id: str, key_index: int, *, expected_index: int) -> None:
        """Compare and set of an entity's EUKey chain index (000): ``key_index`` if the
        entity is still at ``expected_index``; :class:`ClaimConflict` (nothing written)
        if it is not, or if there is no such entity; :class:`StoreError` if
        ``key_index`` < 1."""
        ...


class ServerStore(Protocol):
    """What the server's service layer and the admin CLI need from persistence."""

    def get_user(self, user_id: str) -> UserRecord | None:
        """The user, or None."""
        ...

    def get_entity(self, entity_id: str) -> EntityRecord | None:
        """The entity, or None."""
        ...

    def get_tk(self, entity_id: str) -> TKRecord | None:
        """The TK record of a PNE, or None."""
        ...

    def get_entities(self, entity_ids: Sequence[str]) -> dict[str, EntityRecord]:
        """The entities of ``entity_ids`` that exist, by Entity ID, in one read (the PNEs
        of one establishment); the same records as :meth:`get_entity` of each."""
        ...

    def get_tks(self, entity_ids: Sequence[str]) -> dict[str, TKRecord]:
        """The TK records of ``entity_ids`` that exist, by Entity ID, in one read; the
        same records as :meth:`get_tk` of each."""
        ...

    def get_reply(self, requester: str, txid: bytes) -> StoredReply | None:
        """The stored reply of a transaction, or None."""
        ...

    def nonce_used(self, nonce: bytes) -> bool:
        """Whether a random value was already used (and has not expired)."""
        ...

    def auth_failures(self, user_id: str, *, now: int) -> int:
        """Failed password proofs for ``user_id`` still counted at ``now`` (0 if none)."""
        ...

    def list_entities(self, *, owner: str | None = None) -> list[EntityRecord]:
        """All entities (optionally of one owner), ordered by Entity ID."""
        ...

    def list_users(self) -> list[UserRecord]:
        """All users, ordered by User ID."""
        ...

    def audit_events(self, *, limit: int = 100) -> list[AuditEvent]:
        """The newest audit events, newest first."""
        ...

    def get_establishment(self, gateway_id: str, est_id: bytes) -> PendingEstablishment | None:
        """The pending establishment, or None (never stored, finished, or purged).

        An expired one that was not purged yet is returned as it is: the caller compares
        its ``expires_at`` with its own clock."""
        ...

    def get_pn(self, pn_id: str) -> PNRecord | None:
        """The PN with its members and failures, or None."""
        ...

    def get_pn_owner(self, pn_id: str) -> str | None:
        """The CPNS User owning the PN, or None if there is no such PN (the owner alone:
        both halves of PN Establishment check it)."""
        ...

    def list_pns(self, *, owner: str | None = None, gateway: str | None = None) -> list[PNRecord]:
        """All PNs (optionally of one owner and/or one PN GW), ordered by PN ID."""
        ...

    def write[T](self, fn: Callable[[WriteTx], T]) -> T:
        """Run ``fn`` in one durable transaction (group-committed); return its result."""
        ...

    def write_async[T](self, fn: Callable[[WriteTx], T], *, durable: bool = True) -> Awaitable[T]:
        """:meth:`write` for asyncio callers: does not block the event loop.

        ``durable=False``: the commit is atomic and visible to every reader at once but
        need not be flushed to disk before the caller resumes (a crash of the database
        machine may lose the last fraction of a second of such writes). Only for state
        whose loss is harmless, such as the Digest ``nc`` replay guard.
        """
        ...

    def record_digest_nc(
        self,
        nonce: str,
        *,
        keep_until: int,
        advance: Callable[[tuple[int, int] | None], tuple[int, int]],
    ) -> Awaitable[None]:
        """:meth:`WriteTx.advance_digest_nc` in a transaction of its own, for asyncio
        callers: committed and visible to every process when it resolves, not necessarily
        flushed to disk (see ``durable=False`` of :meth:`write_async`); raises what
        ``advance`` raises (a replayed nc)."""
        ...

    def purge_expired(self, *, now: int) -> int:
        """Delete expired nonces, replies, failure counters, Digest nc states and pending
        establishments (``expires_at`` < ``now``); return how many rows went."""
        ...

    def close(self) -> None:
        """Stop the writer thread and close connections."""
        ...
