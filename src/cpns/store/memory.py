"""An in-memory :class:`~cpns.store.base.ServerStore` for fast tests of the service layer.

It keeps the contract of :class:`cpns.store.sql.SQLStore` where a caller can observe it:
:class:`ConflictError` on a duplicate user, TK record or stored reply, :class:`NonceReused`
on a replayed random value, :class:`StoreError` for an unknown user or entity, an entity
whose owner is not a user, or a malformed EUKey; and *all or nothing per write function*.

All-or-nothing works like SQL savepoints: every change made through the write
transaction pushes an undo step; if the function raises, the steps are replayed backwards
and the store is exactly as before. ``put_tks`` takes its own mark, so a rejected batch
leaves nothing behind even if the function catches the error and goes on.

What it deliberately does not do: seal anything (nothing reaches a disk), survive a
restart, or share state between processes. Writes are serialised by a lock and "commit"
immediately, so there is no group commit to observe.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

from cpns.crypto.hashing import KEY_LEN
from cpns.errors import LocalProtocolError, StoreError
from cpns.store.base import (
    AuditEvent,
    ClaimConflict,
    ConflictError,
    EntityRecord,
    NonceReused,
    PendingEstablishment,
    PNMember,
    PNRecord,
    ServerStore,
    StoredReply,
    TKRecord,
    UserRecord,
    WriteTx,
)
from cpns.store.sql import check_forward, check_pn_results, nonce_digest

__all__ = ["MemoryStore"]

_MISSING: Final = object()


class _Tables:
    """The rows of the store."""

    __slots__ = (
        "audit",
        "auth_failures",
        "digest_nc",
        "entities",
        "establishments",
        "nonces",
        "pns",
        "replies",
        "tks",
        "users",
    )

    def __init__(self) -> None:
        self.users: dict[str, UserRecord] = {}
        self.entities: dict[str, EntityRecord] = {}
        self.tks: dict[str, TKRecord] = {}
        #: Nonce digest -> expires_at.
        self.nonces: dict[bytes, int] = {}
        self.replies: dict[tuple[str, bytes], StoredReply] = {}
        self.audit: list[AuditEvent] = []
        #: User ID -> (failed proofs, expires_at).
        self.auth_failures: dict[str, tuple[int, int]] = {}
        #: Digest nonce -> (highest nc, window bitmap, keep_until).
        self.digest_nc: dict[str, tuple[int, int, int]] = {}
        #: (gw_id, est_id) -> pending establishment.
        self.establishments: dict[tuple[str, bytes], PendingEstablishment] = {}
        #: PN ID -> PN (members ordered by PNE ID).
        self.pns: dict[str, PNRecord] = {}


class _MemoryWriteTx:
    """:class:`WriteTx` over the tables, with an undo log; valid only inside its function."""

    __slots__ = ("_live", "_t", "_undo")

    def __init__(self, tables: _Tables) -> None:
        self._t = tables
        self._undo: list[Callable[[], None]] = []
        self._live = True

    def _tables(self) -> _Tables:
        if not self._live:
            raise LocalProtocolError("a WriteTx is only valid inside its write function")
        return self._t

    def _put[K, V](self, table: dict[K, V], key: K, value: V) -> None:
        """Set ``table[key]`` and log how to undo it."""
        if key in table:
            old = table[key]
            self._undo.append(lambda: table.__setitem__(key, old))
        else:
            self._undo.append(lambda: table.__delitem__(key))
        table[key] = value

    def _rollback_to(self, mark: int) -> None:
        while len(self._undo) > mark:
            self._undo.pop()()

    def _end(self, *, commit: bool) -> None:
        if not commit:
            self._rollback_to(0)
        self._undo.clear()
        self._live = False

    def add_user(self, user: UserRecord) -> None:
        """Insert a user; :class:`ConflictError` if the User ID exists."""
        t = self._tables()
        if user.user_id in t.users:
            raise ConflictError(f"user {user.user_id!r} already exists")
        self._put(t.users, user.user_id, user)

    def set_password_key(self, user_id: str, password_key: bytes) -> None:
        """Replace a user's password key; StoreError if the user does not exist."""
        t = self._tables()
        user = t.users.get(user_id)
        if user is None:
            raise StoreError(f"no user {user_id!r}")
        self._put(
            t.users,
            user_id,
            UserRecord(
                user_id=user.user_id,
                password_key=bytes(password_key),
                created_at=user.created_at,
                disabled=user.disabled,
            ),
        )

    def put_entity(self, entity: EntityRecord) -> None:
        """Insert or replace an entity; StoreError if its owner is unknown."""
        t = self._tables()
        if any(len(k) != KEY_LEN for k in entity.eukeys):
            raise StoreError(f"EUKeys are {KEY_LEN} bytes (entity {entity.entity_id!r})")
        if entity.key_index < 0:
            raise StoreError(f"entity {entity.entity_id!r}: key_index must be >= 0")
        if entity.owner not in t.users:
            raise StoreError(f"entity {entity.entity_id!r}: owner {entity.owner!r} is not a user")
        self._put(t.entities, entity.entity_id, entity)

    def assign_entity(self, entity: EntityRecord, *, expected_epoch: int) -> None:
        """Store an assignment if the entity is absent or still at ``expected_epoch``
        with the same owner and kind, not revoked; :class:`ClaimConflict` otherwise."""
        if entity.epoch != expected_epoch + 1:
            raise StoreError(f"entity {entity.entity_id!r}: epoch must be expected_epoch + 1")
        current = self._tables().entities.get(entity.entity_id)
        if current is not None and (
            current.epoch != expected_epoch
            or current.owner != entity.owner
            or current.kind is not entity.kind
            or current.revoked
        ):
            raise ClaimConflict(f"entity {entity.entity_id!r} changed since it was checked")
        self.put_entity(entity)

    def put_tks(self, records: Sequence[TKRecord]) -> None:
        """Insert TK records; :class:`ConflictError` (and nothing written) on a duplicate."""
        t = self._tables()
        seen: set[str] = set()
        for record in records:
            if record.entity_id in seen:
                raise ConflictError(
                    f"the batch holds two TK records for entity {record.entity_id!r}"
                )
            seen.add(record.entity_id)
        for record in records:
            if record.entity_id in t.tks:
                raise ConflictError(
                    f"a TK record for entity {record.entity_id!r} already exists; "
                    "nothing of the batch was written"
                )
        # Checked before the first insert, so a rejected batch never half-applies.
        for record in records:
            self._put(t.tks, record.entity_id, record)

    def use_nonce(self, nonce: bytes, *, expires_at: int) -> None:
        """Record a random value as used; :class:`NonceReused` if it already was."""
        t = self._tables()
        digest = nonce_digest(nonce)
        if digest in t.nonces:
            raise NonceReused("the random value was already used (replay)")
        self._put(t.nonces, digest, expires_at)

    def record_auth_failure(self, user_id: str, *, now: int, window: int, count: int = 1) -> None:
        """Count failed password proofs (see :class:`~cpns.store.base.WriteTx`)."""
        if count < 1:
            raise LocalProtocolError("count must be >= 1")
        t = self._tables()
        failures, expires_at = t.auth_failures.get(user_id, (0, 0))
        counted = failures if expires_at > now else 0
        self._put(t.auth_failures, user_id, (counted + count, now + window))

    def purge_audit(self, *, before: int) -> int:
        """Delete audit events older than ``before``; return how many went."""
        t = self._tables()
        kept = [e for e in t.audit if e.at >= before]
        gone = len(t.audit) - len(kept)
        if gone:
            old = list(t.audit)
            t.audit[:] = kept
            self._undo.append(lambda: t.audit.__setitem__(slice(None), old))
        return gone

    def advance_digest_nc(
        self,
        nonce: str,
        *,
        keep_until: int,
        advance: Callable[[tuple[int, int] | None], tuple[int, int]],
    ) -> None:
        """Compare and set of a Digest nonce's counter state (see the WriteTx contract)."""
        t = self._tables()
        row = t.digest_nc.get(nonce)
        highest, bitmap = advance(None if row is None else (row[0], row[1]))
        self._put(t.digest_nc, nonce, (highest, bitmap, keep_until))

    def clear_auth_failures(self, user_id: str) -> None:
        """Forget the failed proofs of ``user_id``."""
        t = self._tables()
        if user_id in t.auth_failures:
            old = t.auth_failures.pop(user_id)
            self._undo.append(lambda: t.auth_failures.__setitem__(user_id, old))

    def put_reply(self, reply: StoredReply) -> None:
        """Remember the reply to a transaction; :class:`ConflictError` if one is stored."""
        t = self._tables()
        key = (reply.requester, reply.txid)
        if key in t.replies:
            raise ConflictError(
                f"a reply to transaction {reply.txid.hex()} of {reply.requester!r} "
                "is already stored"
            )
        self._put(t.replies, key, reply)

    def audit(self, event: AuditEvent) -> None:
        """Append an audit event."""
        t = self._tables()
        t.audit.append(event)
        self._undo.append(lambda: t.audit.__delitem__(-1))

    def audit_many(self, events: Sequence[AuditEvent]) -> None:
        """Append audit events, in order."""
        for event in events:
            self.audit(event)

    def set_revoked(self, entity_id: str, revoked: bool) -> None:
        """Revoke or restore an entity; StoreError if it does not exist."""
        t = self._tables()
        entity = t.entities.get(entity_id)
        if entity is None:
            raise StoreError(f"no entity {entity_id!r}")
        self._put(t.entities, entity_id, dataclasses.replace(entity, revoked=revoked))

    def put_establishment(self, establishment: PendingEstablishment) -> None:
        """Store a pending establishment; :class:`ConflictError` if its key is taken."""
        t = self._tables()
        est = establishment
        if len(est.est_id) != 16:
            raise StoreError(f"est_id is 16 bytes, not {len(est.est_id)}")
        key = (est.gw_id, bytes(est.est_id))
        if key in t.establishments:
            raise ConflictError(
                f"establishment {est.est_id.hex()} of {est.gw_id!r} is already stored"
            )
        self._put(t.establishments, key, est)

    def delete_establishment(self, gateway_id: str, est_id: bytes) -> None:
        """Delete a pending establishment; :class:`ClaimConflict` if it is gone."""
        t = self._tables()
        key = (gateway_id, bytes(est_id))
        if key not in t.establishments:
            raise ClaimConflict(
                f"establishment {est_id.hex()} of {gateway_id!r} is not pending (any more)"
            )
        old = t.establishments.pop(key)
        self._undo.append(lambda: t.establishments.__setitem__(key, old))

    def record_pn(
        self,
        pn_id: str,
        gateway_id: str,
        owner: str,
        now: int,
        results: Sequence[PNMember],
    ) -> None:
        """Upsert a PN and its per-PNE results (see :class:`~cpns.store.base.WriteTx`)."""
        t = self._tables()
        check_pn_results(pn_id, results)
        current = t.pns.get(pn_id)
        if current is not None and current.owner != owner:
            raise ConflictError(f"PN {pn_id!r} belongs to another user")
        members = {m.pne_id: m for m in (current.members if current else ())}
        members.update((r.pne_id, r) for r in results)
        record = PNRecord(
            pn_id=pn_id,
            gateway_id=gateway_id,
            owner=owner,
            created_at=current.created_at if current else now,
            updated_at=now,
            members=tuple(members[k] for k in sorted(members)),
        )
        self._put(t.pns, pn_id, record)

    def set_tk_state(self, entity_id: str, tk: bytes, tk_step: int, *, expected_step: int) -> None:
        """Compare and set of the TK ratchet (see :class:`~cpns.store.base.WriteTx`)."""
        check_forward("the TK step", entity_id, tk_step, expected_step)
        t = self._tables()
        current = t.tks.get(entity_id)
        if current is None or current.tk_step != expected_step:
            raise ClaimConflict(f"the TK of {entity_id!r} is not at step {expected_step}")
        self._put(t.tks, entity_id, dataclasses.replace(current, tk=bytes(tk), tk_step=tk_step))

    def set_key_index(self, entity_id: str, key_index: int, *, expected_index: int) -> None:
        """Compare and set of the EUKey chain index (see :class:`~cpns.store.base.WriteTx`)."""
        check_forward("the EUKey index", entity_id, key_index, expected_index)
        t = self._tables()
        current = t.entities.get(entity_id)
        if current is None or current.key_index != expected_index:
            raise ClaimConflict(f"entity {entity_id!r} is not at EUKey index {expected_index}")
        self._put(t.entities, entity_id, dataclasses.replace(current, key_index=key_index))


class MemoryStore:
    """:class:`~cpns.store.base.ServerStore` in dicts; for tests, never for production."""

    def __init__(self, *, reply_retention: int = 86400) -> None:
        """An empty store; replies older than ``reply_retention`` seconds are purgeable."""
        if reply_retention < 0:
            raise LocalProtocolError("reply_retention must be >= 0 seconds")
        self._t = _Tables()
        self._reply_retention = reply_retention
        # Reentrant so that a write function may read through the store without deadlock.
        self._lock = threading.RLock()
        self._writing = threading.local()
        self._closed = False

    def __repr__(self) -> str:
        return f"<MemoryStore users={len(self._t.users)} entities={len(self._t.entities)}>"

    def _open_tables(self) -> _Tables:
        if self._closed:
            raise StoreError("store is closed")
        return self._t

    def get_user(self, user_id: str) -> UserRecord | None:
        """The user, or None."""
        with self._lock:
            return self._open_tables().users.get(user_id)

    def get_entity(self, entity_id: str) -> EntityRecord | None:
        """The entity, or None."""
        with self._lock:
            return self._open_tables().entities.get(entity_id)

    def get_tk(self, entity_id: str) -> TKRecord | None:
        """The TK record of a PNE, or None."""
        with self._lock:
            return self._open_tables().tks.get(entity_id)

    def get_entities(self, entity_ids: Sequence[str]) -> dict[str, EntityRecord]:
        """The entities of ``entity_ids`` that exist, by Entity ID."""
        with self._lock:
            entities = self._open_tables().entities
            return {i: entities[i] for i in entity_ids if i in entities}

    def get_tks(self, entity_ids: Sequence[str]) -> dict[str, TKRecord]:
        """The TK records of ``entity_ids`` that exist, by Entity ID."""
        with self._lock:
            tks = self._open_tables().tks
            return {i: tks[i] for i in entity_ids if i in tks}

    def get_reply(self, requester: str, txid: bytes) -> StoredReply | None:
        """The stored reply of a transaction, or None."""
        with self._lock:
            return self._open_tables().replies.get((requester, bytes(txid)))

    def nonce_used(self, nonce: bytes) -> bool:
        """Whether a random value was recorded as used and not purged yet."""
        with self._lock:
            return nonce_digest(nonce) in self._open_tables().nonces

    def auth_failures(self, user_id: str, *, now: int) -> int:
        """Failed password proofs of ``user_id`` still counted at ``now``."""
        with self._lock:
            failures, expires_at = self._open_tables().auth_failures.get(user_id, (0, 0))
        return failures if expires_at > now else 0

    def list_entities(self, *, owner: str | None = None) -> list[EntityRecord]:
        """All entities (optionally of one owner), ordered by Entity ID."""
        with self._lock:
            entities = self._open_tables().entities
            return [
                entities[k] for k in sorted(entities) if owner is None or entities[k].owner == owner
            ]

    def list_users(self) -> list[UserRecord]:
        """All users, ordered by User ID."""
        with self._lock:
            users = self._open_tables().users
            return [users[k] for k in sorted(users)]

    def audit_events(self, *, limit: int = 100) -> list[AuditEvent]:
        """The newest audit events, newest first."""
        if limit <= 0:
            return []
        with self._lock:
            return self._open_tables().audit[::-1][:limit]

    def get_establishment(self, gateway_id: str, est_id: bytes) -> PendingEstablishment | None:
        """The pending establishment, or None."""
        with self._lock:
            return self._open_tables().establishments.get((gateway_id, bytes(est_id)))

    def get_pn(self, pn_id: str) -> PNRecord | None:
        """The PN with its members and failures, or None."""
        with self._lock:
            return self._open_tables().pns.get(pn_id)

    def get_pn_owner(self, pn_id: str) -> str | None:
        """The CPNS User owning the PN, or None if there is no such PN."""
        pn = self.get_pn(pn_id)
        return None if pn is None else pn.owner

    def list_pns(self, *, owner: str | None = None, gateway: str | None = None) -> list[PNRecord]:
        """All PNs (optionally of one owner and/or one PN GW), ordered by PN ID."""
        with self._lock:
            pns = self._open_tables().pns
            return [
                pns[k]
                for k in sorted(pns)
                if (owner is None or pns[k].owner == owner)
                and (gateway is None or pns[k].gateway_id == gateway)
            ]

    def write[T](self, fn: Callable[[WriteTx], T]) -> T:
        """Run ``fn`` all or nothing; return its result or re-raise its exception."""
        if getattr(self._writing, "active", False):
            raise LocalProtocolError("write() called from inside a write function")
        with self._lock:
            tx = _MemoryWriteTx(self._open_tables())
            self._writing.active = True
            try:
                result = fn(tx)
            except BaseException:
                tx._end(commit=False)
                raise
            finally:
                self._writing.active = False
            tx._end(commit=True)
            return result

    def write_async[T](
        self, fn: Callable[[WriteTx], T], *, durable: bool = True
    ) -> asyncio.Future[T]:
        """:meth:`write` for asyncio callers; runs at once and returns a done future
        (``durable`` makes no difference in memory)."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        try:
            future.set_result(self.write(fn))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def record_digest_nc(
        self,
        nonce: str,
        *,
        keep_until: int,
        advance: Callable[[tuple[int, int] | None], tuple[int, int]],
    ) -> asyncio.Future[None]:
        """The compare and set in a write of its own; a done future."""
        return self.write_async(
            lambda tx: tx.advance_digest_nc(nonce, keep_until=keep_until, advance=advance)
        )

    def purge_expired(self, *, now: int) -> int:
        """Delete nonces and pending establishments with ``expires_at`` < ``now``, replies
        older than the retention, and spent failure counters and Digest nc states."""
        with self._lock:
            t = self._open_tables()
            nonces = [k for k, exp in t.nonces.items() if exp < now]
            cutoff = now - self._reply_retention
            replies = [k for k, r in t.replies.items() if r.created_at < cutoff]
            for n in nonces:
                del t.nonces[n]
            for r in replies:
                del t.replies[r]
            failures = [u for u, (_, exp) in t.auth_failures.items() if exp <= now]
            for u in failures:
                del t.auth_failures[u]
            counters = [c for c, (_, _, until) in t.digest_nc.items() if until < now]
            for c in counters:
                del t.digest_nc[c]
            pending = [k for k, e in t.establishments.items() if e.expires_at < now]
            for k in pending:
                del t.establishments[k]
            return len(nonces) + len(replies) + len(failures) + len(counters) + len(pending)

    def close(self) -> None:
        """Mark the store closed; later calls raise :class:`StoreError`."""
        self._closed = True


if TYPE_CHECKING:

    def _satisfies_protocols(store: MemoryStore, tx: _MemoryWriteTx) -> tuple[ServerStore, WriteTx]:
        """Let mypy check MemoryStore and its write transaction against the contract."""
        return store, tx
