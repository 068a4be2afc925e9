"""The server store on SQL: SQLite (WAL, the default) or PostgreSQL, one implementation.

Theory of operation
===================

**Durable, and fast anyway (DESIGN §8).** Every commit is fsynced (``synchronous=FULL`` in
WAL mode), because a reply that depends on a fact (key assigned, chain advanced, nonce
used) may only be sent once that fact is on disk (DESIGN §6). An fsync costs about a
millisecond, which caps one-commit-per-request at roughly 0.8k writes/s. The store
therefore uses *group commit*: one writer thread owns the only write connection;
:meth:`SQLStore.write` and :meth:`SQLStore.write_async` enqueue a job and wait; the writer
takes every queued job (up to ``max_batch``), opens ONE transaction, runs each job in its
own ``SAVEPOINT``, commits once, and only then resolves every caller. Under load many
procedures share one fsync; with a single caller nothing waits for a batch to fill, so
latency is one commit, as before. A job that raises is rolled back to its savepoint and
its exception goes to its caller alone; the other jobs of the batch still commit.

**Several processes, one file (DESIGN §6).** Server processes may open the same database.
Each has its own writer, whose transactions start with ``BEGIN IMMEDIATE`` so the write
lock is taken up front (no deadlock-prone lock upgrade), waiting up to ``busy_timeout``.
Readers use one read-only connection per thread (``threading.local``) and, thanks to WAL,
never block and are never blocked by writers. Every connection is tracked and closed by
:meth:`SQLStore.close`.

**Secure Storage (002 §3.2).** Secret columns (``users.password_key``, ``entities.eukeys``,
``tk_records.tk``, ``replies.reply``, ``pn_establishments.state``) hold
:func:`cpns.crypto.keywrap.seal` blobs under the master key, which lives outside the
database (:class:`cpns.store.masterkey.MasterKey`).
The purpose names ``table.column`` and the associated data is the row's primary key, so a
sealed value copied into another row or column does not open. A ``meta`` row sealed under
the master key is checked at open: a wrong master key fails at start-up with a clear
:class:`StoreError`, not later on the first secret read. Used nonces are stored as their
SHA-256, never in clear. Random GCM nonces (96 bits) are safe far beyond the number of
rows one server holds; each column has its own HKDF-derived key.

**Portability.** All SQL of the store is in this module. Statements use ``?`` placeholders
and only portable syntax (``INSERT ... ON CONFLICT ... DO UPDATE / DO NOTHING``);
:class:`_Dialect` holds what differs (placeholder style, how to begin a write transaction,
where the schema version lives, how to tell a unique from a foreign-key violation, whether
a failed statement aborts the transaction). :meth:`SQLStore.open` takes a file name
(SQLite) or a ``postgresql://`` URL (PostgreSQL through psycopg 3, whose connections
:mod:`cpns.store.postgres` makes look like ``sqlite3`` ones). On PostgreSQL the writer is
the same thread with the same batches and savepoints; its connection forces
``synchronous_commit = on``; readers borrow connections from a bounded pool instead of
holding one per thread. A failed statement aborts a whole PostgreSQL transaction, so
duplicates are detected with ``ON CONFLICT DO NOTHING`` (rowcount 0) on both engines, and
the statements that can still fail on a constraint run in their own savepoint there.

**Migrations.** ``migrations/NNNN_name.sql`` (SQLite) and ``migrations/postgresql/`` (the
same numbers and names, PostgreSQL DDL) are applied in order inside one write transaction
(``BEGIN IMMEDIATE`` on SQLite; an advisory lock on PostgreSQL), each followed by recording
its number (``PRAGMA user_version``; the ``schema_version`` table), so two processes
starting together apply them once, and reopening applies nothing. Numbers increase but may
have gaps (each change takes its own number); every one above the recorded version runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import queue
import re
import secrets
import sqlite3
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol, Self

import cbor2
import psycopg

from cpns import metrics
from cpns.crypto.hashing import KEY_LEN, Part, hash_values
from cpns.crypto.keywrap import NONCE_LEN, Sealer
from cpns.errors import AuthenticationFailed, LocalProtocolError, StoreError
from cpns.records import FLOW_NONE, FLOW_RAND_HASH, FLOW_TK
from cpns.store.base import (
    AuditEvent,
    ClaimConflict,
    ConflictError,
    EntityRecord,
    NonceReused,
    PendingEntry,
    PendingEstablishment,
    PNMember,
    PNRecord,
    ServerStore,
    StoredReply,
    TKRecord,
    UserRecord,
    WriteTx,
)
from cpns.store.masterkey import MasterKey
from cpns.store.postgres import PGConnection, PGReaders, is_dsn, redact_dsn, scrub
from cpns.types import EntityKind

__all__ = [
    "SQLStore",
    "WriteStats",
    "check_forward",
    "check_pn_results",
    "decode_establishment_state",
    "encode_establishment_state",
    "nonce_digest",
]

_log = logging.getLogger(__name__)

#: Default number of jobs the writer puts in one transaction.
DEFAULT_MAX_BATCH: Final = 512
#: Default most read connections of a PostgreSQL store (one process).
DEFAULT_MAX_READERS: Final = 16
#: IDs per query of a batched read (:meth:`SQLStore.get_entities`): an establishment has
#: at most 64 PNEs, far under SQLite's and PostgreSQL's parameter limits.
MAX_BATCH_READ: Final = 128
#: Label of the nonce digest stored in ``nonces.nonce_hash`` (DESIGN §4 labelled hashes).
NONCE_HASH_LABEL: Final = "cpns/v1/store/nonce"
_KEY_CHECK_PLAINTEXT: Final = b"cpns store master key check v1"
_MIGRATION_NAME: Final = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


#: Compare-and-set attempts of one Digest nc update before giving up.
_CAS_TRIES: Final = 16


def _bits(bitmap: int) -> bytes:
    """A window bitmap as big-endian bytes (at least one), as ``digest_nc.seen`` holds it."""
    return bitmap.to_bytes(max(1, (bitmap.bit_length() + 7) // 8), "big")


def _advance_nc(
    execute: Callable[[str, Sequence[Any]], Any],
    nonce: str,
    *,
    keep_until: int,
    advance: Callable[[tuple[int, int] | None], tuple[int, int]],
) -> None:
    """The compare and set of a Digest nonce's counter state, over ``execute``.

    Read, ``advance``, then write only if the row is still as read (INSERT ... DO NOTHING
    for a new nonce, UPDATE ... WHERE old state for a known one). Under SQLite's write lock
    the first try wins; on PostgreSQL (READ COMMITTED) another process may change the row
    in between: then the statement touches nothing and the next try reads the state it
    committed. Whatever ``advance`` raises (a replayed nc) propagates, nothing written.
    """
    for _ in range(_CAS_TRIES):
        row = execute(_Q.DIGEST_NC_GET, (nonce,)).fetchone()
        if row is None:
            highest, seen = advance(None)
            params: tuple[Any, ...] = (nonce, highest, _bits(seen), keep_until)
            cur = execute(_Q.DIGEST_NC_INSERT, params)
        else:
            old = (int(row[0]), int.from_bytes(bytes(row[1]), "big"))
            highest, seen = advance(old)
            params = (highest, _bits(seen), keep_until, nonce, old[0], bytes(row[1]))
            cur = execute(_Q.DIGEST_NC_UPDATE, params)
        if cur.rowcount == 1:
            return
    raise StoreError("Digest nonce count contended too long; try again")


def nonce_digest(nonce: bytes) -> bytes:
    """What the store keeps of a used random value: its labelled SHA-256."""
    return hash_values(NONCE_HASH_LABEL, nonce)


# ---------------------------------------------------------------------------------------
# Dialect: the few things that differ between SQL engines.


class _Cursor(Protocol):
    """What the store reads from a cursor of either driver."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class _Conn(Protocol):
    """What the store uses of a connection: ``sqlite3.Connection`` or :class:`PGConnection`."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> _Cursor: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]], /) -> _Cursor: ...

    def executescript(self, script: str, /) -> Any: ...

    @property
    def in_transaction(self) -> bool: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Dialect:
    """What differs between SQL back ends; every statement below is written for it."""

    #: Name for messages.
    name: str
    #: Statement that starts a write transaction and takes the write lock up front.
    begin_write: str
    #: Placeholder of the DB-API driver; statements are written with ``?``.
    placeholder: str
    #: The driver's base exception class(es).
    error: tuple[type[Exception], ...]
    #: Folder of the packaged migrations under ``cpns/store``.
    migrations: str
    #: Statements run first in the migration transaction (serialise concurrent migrators).
    migration_lock: tuple[str, ...]
    #: Statement reading the schema version (one row, one integer).
    version_get: str
    #: Statements recording schema version ``{version}``.
    version_set: tuple[str, ...]
    #: Whether a failed statement aborts the whole transaction (PostgreSQL) rather than
    #: only itself (SQLite): statements that may fail on a constraint then run in their own
    #: savepoint, so a write function that catches the error can go on writing.
    errors_abort_transaction: bool
    #: SQLSTATE (PostgreSQL) or extended result name (SQLite) of a unique violation.
    unique_violation: tuple[str, ...]
    #: The same for a foreign-key violation.
    foreign_key_violation: tuple[str, ...]
    #: Statements run before ``begin_write`` to make the next commits flushed to disk
    #: (``[True]``) or only atomic (``[False]``), when the batch's need changes.
    durability_switch: dict[bool, str]
    #: Statement run right after ``begin_write`` in a batch that need not be flushed.
    relax_in_transaction: str | None

    def sql(self, statement: str) -> str:
        """``statement`` with its ``?`` placeholders in the driver's style."""
        if self.placeholder == "?":
            return statement
        return statement.replace("?", self.placeholder)

    def _code(self, exc: BaseException) -> str:
        return str(getattr(exc, "sqlite_errorname", None) or getattr(exc, "sqlstate", "") or "")

    def is_unique_violation(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a primary-key or unique-constraint violation."""
        return self._code(exc) in self.unique_violation

    def is_foreign_key_violation(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a foreign-key violation."""
        return self._code(exc) in self.foreign_key_violation


_SQLITE: Final = _Dialect(
    name="sqlite",
    begin_write="BEGIN IMMEDIATE",
    placeholder="?",
    error=(sqlite3.Error,),
    migrations="migrations",
    migration_lock=(),
    version_get="PRAGMA user_version",
    version_set=("PRAGMA user_version = {version}",),
    errors_abort_transaction=False,
    unique_violation=("SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"),
    foreign_key_violation=("SQLITE_CONSTRAINT_FOREIGNKEY",),
    # NORMAL in WAL mode: the commit is atomic and survives a crash of the process, and
    # the next FULL commit fsyncs it along with its own frames.
    durability_switch={True: "PRAGMA synchronous = FULL", False: "PRAGMA synchronous = NORMAL"},
    relax_in_transaction=None,
)

_PG_RELAXED_COMMIT: Final = b"SET LOCAL synchronous_commit = off"

#: PostgreSQL (psycopg 3). Transactions are READ COMMITTED; every check-and-write of the
#: store is one statement (compare and set, ON CONFLICT), which is atomic at that level.
#: Concurrent migrators queue on a transaction-scoped advisory lock.
_POSTGRESQL: Final = _Dialect(
    name="postgresql",
    begin_write="BEGIN",
    placeholder="%s",
    error=(psycopg.Error,),
    migrations="migrations/postgresql",
    migration_lock=(
        "SELECT pg_advisory_xact_lock(7463725301)",
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    ),
    version_get="SELECT COALESCE(MAX(version), 0) FROM schema_version",
    version_set=(
        "DELETE FROM schema_version",
        "INSERT INTO schema_version (version) VALUES ({version})",
    ),
    errors_abort_transaction=True,
    unique_violation=("23505",),
    foreign_key_violation=("23503",),
    durability_switch={},
    # The commit is visible at once; its WAL is flushed within wal_writer_delay (x3).
    relax_in_transaction=_PG_RELAXED_COMMIT.decode(),
)


# ---------------------------------------------------------------------------------------
# Every statement of the store.


class _Q:
    """The statements, in one place (portable SQL, ``?`` placeholders)."""

    #: The inserts below that must not overwrite an existing row report a duplicate by
    #: inserting nothing (rowcount 0) rather than by an error, which on PostgreSQL would
    #: abort the whole transaction of the batch.
    USER_INSERT: Final = (
        "INSERT INTO users (user_id, password_key_sealed, created_at, disabled) "
        "VALUES (?, ?, ?, ?) ON CONFLICT (user_id) DO NOTHING"
    )
    USER_SET_KEY: Final = "UPDATE users SET password_key_sealed = ? WHERE user_id = ?"
    USER_GET: Final = (
        "SELECT user_id, password_key_sealed, created_at, disabled FROM users WHERE user_id = ?"
    )
    USER_LIST: Final = (
        "SELECT user_id, password_key_sealed, created_at, disabled FROM users ORDER BY user_id"
    )
    _ENTITY_INSERT: Final = (
        "INSERT INTO entities (entity_id, kind, owner, eukeys_sealed, key_index, "
        "assigned_via, assigned_at, revoked, epoch) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (entity_id) DO UPDATE SET kind = excluded.kind, owner = excluded.owner, "
        "eukeys_sealed = excluded.eukeys_sealed, key_index = excluded.key_index, "
        "assigned_via = excluded.assigned_via, assigned_at = excluded.assigned_at, "
        "revoked = excluded.revoked, epoch = excluded.epoch"
    )
    ENTITY_UPSERT: Final = _ENTITY_INSERT
    #: Compare and set of an assignment (D-003-11): the row is written only if it is
    #: absent or still at the epoch the checks saw, with the same owner and kind and not
    #: revoked. One statement, so two racing claims cannot both pass.
    ENTITY_ASSIGN: Final = (
        _ENTITY_INSERT + " WHERE entities.epoch = ? AND entities.owner = excluded.owner "
        "AND entities.kind = excluded.kind AND entities.revoked = 0"
    )
    _ENTITY_COLUMNS: Final = (
        "SELECT entity_id, kind, owner, eukeys_sealed, key_index, assigned_via, "
        "assigned_at, revoked, epoch FROM entities"
    )
    ENTITY_GET: Final = _ENTITY_COLUMNS + " WHERE entity_id = ?"
    #: Several entities at once (``{}``: as many ``?`` as IDs).
    ENTITIES_GET_IN: Final = _ENTITY_COLUMNS + " WHERE entity_id IN ({})"
    ENTITY_LIST: Final = _ENTITY_COLUMNS + " ORDER BY entity_id"
    ENTITY_LIST_OWNER: Final = _ENTITY_COLUMNS + " WHERE owner = ? ORDER BY entity_id"
    ENTITY_SET_REVOKED: Final = "UPDATE entities SET revoked = ? WHERE entity_id = ?"
    TK_INSERT: Final = (
        "INSERT INTO tk_records (entity_id, tk_sealed, source, imported_at, tk_step) "
        "VALUES (?, ?, ?, ?, ?)"
    )
    TK_GET: Final = (
        "SELECT entity_id, tk_sealed, source, imported_at, tk_step FROM tk_records "
        "WHERE entity_id = ?"
    )
    #: Several TK records at once (``{}``: as many ``?`` as IDs).
    TKS_GET_IN: Final = (
        "SELECT entity_id, tk_sealed, source, imported_at, tk_step FROM tk_records "
        "WHERE entity_id IN ({})"
    )
    #: Compare and set of the TK ratchet: written only if the step is still the one read.
    TK_SET_STATE: Final = (
        "UPDATE tk_records SET tk_sealed = ?, tk_step = ? WHERE entity_id = ? AND tk_step = ?"
    )
    #: Compare and set of the EUKey chain index.
    ENTITY_SET_INDEX: Final = (
        "UPDATE entities SET key_index = ? WHERE entity_id = ? AND key_index = ?"
    )
    EST_INSERT: Final = (
        "INSERT INTO pn_establishments (gateway_id, est_id, pn_id, state_sealed, created_at, "
        "expires_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (gateway_id, est_id) DO NOTHING"
    )
    EST_GET: Final = (
        "SELECT gateway_id, est_id, pn_id, state_sealed, created_at, expires_at "
        "FROM pn_establishments WHERE gateway_id = ? AND est_id = ?"
    )
    EST_DELETE: Final = "DELETE FROM pn_establishments WHERE gateway_id = ? AND est_id = ?"
    EST_PURGE: Final = "DELETE FROM pn_establishments WHERE expires_at < ?"
    #: Upsert of a PN that never changes its owner: a PN of another owner is left alone
    #: (rowcount 0), in one statement, so two users racing on one PN ID cannot both win.
    PN_UPSERT: Final = (
        "INSERT INTO pns (pn_id, gateway_id, owner, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (pn_id) DO UPDATE SET "
        "gateway_id = excluded.gateway_id, updated_at = excluded.updated_at "
        "WHERE pns.owner = excluded.owner"
    )
    PN_MEMBER_UPSERT: Final = (
        "INSERT INTO pn_members (pn_id, pne_id, flow, status, at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (pn_id, pne_id) DO UPDATE SET flow = excluded.flow, "
        "status = excluded.status, at = excluded.at"
    )
    #: One statement (one snapshot) for a PN and its members: a PN without members comes
    #: back once with NULL member columns. Filters: see :func:`_pn_query`.
    _PN_SELECT: Final = (
        "SELECT p.pn_id, p.gateway_id, p.owner, p.created_at, p.updated_at, "
        "m.pne_id, m.flow, m.status, m.at FROM pns p "
        "LEFT JOIN pn_members m ON m.pn_id = p.pn_id"
    )
    PN_GET: Final = _PN_SELECT + " WHERE p.pn_id = ? ORDER BY m.pne_id"
    PN_OWNER: Final = "SELECT owner FROM pns WHERE pn_id = ?"
    PN_LIST: Final = _PN_SELECT + " ORDER BY p.pn_id, m.pne_id"
    PN_LIST_OWNER: Final = _PN_SELECT + " WHERE p.owner = ? ORDER BY p.pn_id, m.pne_id"
    PN_LIST_GATEWAY: Final = _PN_SELECT + " WHERE p.gateway_id = ? ORDER BY p.pn_id, m.pne_id"
    PN_LIST_BOTH: Final = (
        _PN_SELECT + " WHERE p.owner = ? AND p.gateway_id = ? ORDER BY p.pn_id, m.pne_id"
    )
    TK_EXISTS: Final = "SELECT 1 FROM tk_records WHERE entity_id = ?"
    NONCE_INSERT: Final = (
        "INSERT INTO nonces (nonce_hash, expires_at) VALUES (?, ?) "
        "ON CONFLICT (nonce_hash) DO NOTHING"
    )
    NONCE_EXISTS: Final = "SELECT 1 FROM nonces WHERE nonce_hash = ?"
    NONCE_PURGE: Final = "DELETE FROM nonces WHERE expires_at < ?"
    AUTH_FAILURE_UPSERT: Final = (
        "INSERT INTO auth_failures (user_id, failures, expires_at) VALUES (?, ?, ?) "
        "ON CONFLICT (user_id) DO UPDATE SET failures = CASE WHEN "
        "auth_failures.expires_at > ? THEN auth_failures.failures + excluded.failures "
        "ELSE excluded.failures END, expires_at = excluded.expires_at"
    )
    AUTH_FAILURE_GET: Final = (
        "SELECT failures FROM auth_failures WHERE user_id = ? AND expires_at > ?"
    )
    AUTH_FAILURE_DELETE: Final = "DELETE FROM auth_failures WHERE user_id = ?"
    AUTH_FAILURE_PURGE: Final = "DELETE FROM auth_failures WHERE expires_at <= ?"
    REPLY_INSERT: Final = (
        "INSERT INTO replies (requester, txid, request_digest, reply_sealed, created_at) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (requester, txid) DO NOTHING"
    )
    REPLY_GET: Final = (
        "SELECT requester, txid, request_digest, reply_sealed, created_at FROM replies "
        "WHERE requester = ? AND txid = ?"
    )
    REPLY_PURGE: Final = "DELETE FROM replies WHERE created_at < ?"
    DIGEST_NC_GET: Final = "SELECT highest, seen FROM digest_nc WHERE nonce = ?"
    DIGEST_NC_INSERT: Final = (
        "INSERT INTO digest_nc (nonce, highest, seen, keep_until) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (nonce) DO NOTHING"
    )
    #: Compare and set: written only if the state is still the one read.
    DIGEST_NC_UPDATE: Final = (
        "UPDATE digest_nc SET highest = ?, seen = ?, keep_until = ? "
        "WHERE nonce = ? AND highest = ? AND seen = ?"
    )
    DIGEST_NC_PURGE: Final = "DELETE FROM digest_nc WHERE keep_until < ?"
    AUDIT_INSERT: Final = (
        "INSERT INTO audit (at, actor, procedure, outcome, entity_id, user_id, hop, "
        "correlation_id, detail, count, source, flow_id) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    AUDIT_LIST: Final = (
        "SELECT at, actor, procedure, outcome, entity_id, user_id, hop, correlation_id, "
        "detail, count, source, flow_id FROM audit ORDER BY id DESC LIMIT ?"
    )
    AUDIT_PURGE: Final = "DELETE FROM audit WHERE at < ?"
    META_GET: Final = "SELECT value FROM meta WHERE name = ?"
    META_INSERT: Final = "INSERT INTO meta (name, value) VALUES (?, ?)"


# ---------------------------------------------------------------------------------------
# Sealing of secret columns.


class _Sealer:
    """Seals and opens secret columns under the master key, bound to table.column and row."""

    __slots__ = ("_key", "_keys", "key_id")

    def __init__(self, master_key: MasterKey) -> None:
        self._key = master_key.key
        self.key_id = master_key.key_id
        #: One keywrap.Sealer per column, derived on first use (a handful of columns): each
        #: PNE authentication opens several sealed values, and deriving the column's key
        #: (HKDF + AES key schedule) each time was most of the cost of an open.
        self._keys: dict[str, Sealer] = {}

    def _for(self, column: str) -> Sealer:
        key = self._keys.get(column)
        if key is None:
            key = self._keys[column] = Sealer(self._key, "store/" + column)
        return key

    def seal(self, column: str, value: bytes, row: tuple[Part, ...]) -> bytes:
        """Seal ``value`` of ``column`` ("table.column") for the row with primary key ``row``."""
        return self._for(column).seal(value, context=row, nonce=secrets.token_bytes(NONCE_LEN))

    def open(self, column: str, blob: bytes, row: tuple[Part, ...]) -> bytes:
        """Open a sealed ``column`` value; :class:`StoreError` if it does not open."""
        try:
            return self._for(column).open(blob, context=row)
        except AuthenticationFailed:
            raise StoreError(
                f"the sealed {column} of row {_describe(row)} does not open: the row was "
                f"altered or copied from another row, or the store is opened with the wrong "
                f"master key (this one is {self.key_id})"
            ) from None


def _describe(row: tuple[Part, ...]) -> str:
    return ", ".join(p.hex() if isinstance(p, bytes) else repr(p) for p in row)


def _audit_event(row: Any) -> AuditEvent:
    (
        at,
        actor,
        procedure,
        outcome,
        entity_id,
        user_id,
        hop,
        correlation_id,
        detail,
        count,
        source,
        flow_id,
    ) = row
    return AuditEvent(
        at=at,
        actor=actor,
        procedure=procedure,
        outcome=outcome,
        entity_id=entity_id,
        user_id=user_id,
        hop=hop,
        correlation_id=correlation_id,
        detail=detail,
        count=count,
        source=source,
        flow_id=flow_id,
    )


@functools.lru_cache(maxsize=64)
def _eukey_splitter(count: int) -> struct.Struct:
    """Unpacks ``count`` EUKeys in one C call (a 003 chain is up to 1024 keys, read on
    every PNE authentication: a Python loop over it was a tenth of the server's CPU)."""
    return struct.Struct(f"{KEY_LEN}s" * count)


def _split_eukeys(blob: bytes) -> tuple[bytes, ...]:
    if len(blob) % KEY_LEN:
        raise StoreError(f"entities.eukeys holds {len(blob)} bytes, not a multiple of {KEY_LEN}")
    keys: tuple[bytes, ...] = _eukey_splitter(len(blob) // KEY_LEN).unpack(blob)
    return keys


#: Version tag of the sealed CBOR state of a pending establishment.
_EST_STATE_V1: Final = 1


def encode_establishment_state(est: PendingEstablishment) -> bytes:
    """The secret part of a pending establishment (rand_server and its entries) as the
    CBOR value ``pn_establishments.state`` seals."""
    entries = [
        [e.pne_id, e.rand_pne, e.flow, e.local_eukey, e.tk_step, e.key_index, e.status]
        for e in est.entries
    ]
    return cbor2.dumps([_EST_STATE_V1, est.rand_server, entries])


def decode_establishment_state(
    blob: bytes, *, gw_id: str, est_id: bytes, pn_id: str, created_at: int, expires_at: int
) -> PendingEstablishment:
    """The inverse of :func:`encode_establishment_state`; :class:`StoreError` if it is
    not one."""
    try:
        version, rand_server, raw = cbor2.loads(blob)
        if version != _EST_STATE_V1 or not isinstance(rand_server, bytes):
            raise ValueError("version or rand_server")
        entries = []
        for pne_id, rand_pne, flow, local, step, index, status in raw:
            if not (
                isinstance(pne_id, str)
                and isinstance(rand_pne, bytes)
                and isinstance(flow, str)
                and isinstance(status, str)
                and (local is None or isinstance(local, bytes))
                and (step is None or isinstance(step, int))
                and (index is None or isinstance(index, int))
            ):
                raise ValueError("entry types")
            entries.append(
                PendingEntry(
                    pne_id=pne_id,
                    rand_pne=rand_pne,
                    flow=flow,
                    local_eukey=local,
                    tk_step=step,
                    key_index=index,
                    status=status,
                )
            )
    except (ValueError, TypeError, cbor2.CBORDecodeError) as exc:
        raise StoreError(
            f"the pending establishment {est_id.hex()} of {gw_id!r} is malformed: {exc}"
        ) from None
    return PendingEstablishment(
        gw_id=gw_id,
        est_id=est_id,
        pn_id=pn_id,
        rand_server=rand_server,
        created_at=created_at,
        expires_at=expires_at,
        entries=tuple(entries),
    )


def check_pn_results(pn_id: str, results: Sequence[PNMember]) -> None:
    """The checks :meth:`WriteTx.record_pn` makes before writing (shared by both stores)."""
    seen: set[str] = set()
    for r in results:
        if r.pne_id in seen:
            raise ConflictError(f"PN {pn_id!r}: the results list PNE {r.pne_id!r} twice")
        seen.add(r.pne_id)
        if r.flow not in PN_FLOWS:
            raise StoreError(f"PN {pn_id!r}: PNE {r.pne_id!r} has unknown flow {r.flow!r}")
        if not r.status:
            raise StoreError(f"PN {pn_id!r}: PNE {r.pne_id!r} has an empty status")


def check_forward(what: str, entity_id: str, new: int, expected: int) -> None:
    """A ratchet step or chain index only moves forward (shared by both stores)."""
    if new <= expected:
        raise StoreError(f"{what} of {entity_id!r} only moves forward ({expected} -> {new})")


#: The flows a PN member row may name.
PN_FLOWS: Final = frozenset({FLOW_RAND_HASH, FLOW_TK, FLOW_NONE})


def _pn_records(rows: list[Any]) -> list[PNRecord]:
    """PN records from the rows of ``_PN_SELECT`` (ordered by PN ID, then PNE ID)."""
    out: list[PNRecord] = []
    head: tuple[Any, ...] | None = None
    members: list[PNMember] = []

    def flush() -> None:
        if head is not None:
            pn_id, gateway_id, owner, created_at, updated_at = head
            out.append(
                PNRecord(
                    pn_id=pn_id,
                    gateway_id=gateway_id,
                    owner=owner,
                    created_at=created_at,
                    updated_at=updated_at,
                    members=tuple(members),
                )
            )

    for row in rows:
        if head is None or row[0] != head[0]:
            flush()
            head = tuple(row[:5])
            members = []
        if row[5] is not None:
            members.append(PNMember(pne_id=row[5], flow=row[6], status=row[7], at=row[8]))
    flush()
    return out


# ---------------------------------------------------------------------------------------
# Connections and migrations.


def _connect_sqlite(path: Path, *, busy_timeout: float, read_only: bool) -> sqlite3.Connection:
    """A SQLite connection with the store's settings.

    ``autocommit=True`` hands transaction control to us: the writer issues BEGIN
    IMMEDIATE / SAVEPOINT / COMMIT itself, and ``sqlite3`` never begins or commits behind
    our back (not even in ``executescript``). ``check_same_thread=False`` only allows
    :meth:`SQLStore.close` to close a reader from another thread; each connection is
    otherwise used by one thread.
    """
    conn = sqlite3.connect(
        path, timeout=busy_timeout, autocommit=True, check_same_thread=False, cached_statements=64
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        if read_only:
            conn.execute("PRAGMA query_only = ON")
        else:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{path}: cannot switch to WAL journal mode (got {mode})")
            # FULL: in WAL mode the WAL is fsynced at every commit, so a commit is durable.
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _migrations(dialect: _Dialect) -> list[tuple[int, str, str]]:
    """The packaged migrations of ``dialect`` as (version, file name, SQL), in order."""
    found: list[tuple[int, str, str]] = []
    folder = resources.files("cpns.store")
    for part in dialect.migrations.split("/"):
        folder = folder / part
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    # Numbers only increase; a gap is allowed (migrations are written on branches in
    # parallel, each taking its own number), a duplicate is not.
    if len(set(versions)) != len(versions) or (versions and versions[0] < 1):
        raise StoreError(f"packaged migrations are not uniquely numbered from 1: {versions}")
    return found


def _migrate(conn: _Conn, dialect: _Dialect, where: str) -> int:
    """Bring the schema up to date in one transaction; return the resulting version."""
    migrations = _migrations(dialect)
    latest = migrations[-1][0] if migrations else 0
    conn.execute(dialect.begin_write)
    try:
        for statement in dialect.migration_lock:
            conn.execute(statement)
        # Read the version inside the write transaction: a process that started at the
        # same time and migrated first is seen here, so nothing is applied twice.
        current = int(conn.execute(dialect.version_get).fetchone()[0])
        if current > latest:
            raise StoreError(
                f"{where} has schema version {current}, newer than this cpns ({latest}); "
                "upgrade cpns before opening it"
            )
        for version, name, script in migrations:
            if version <= current:
                continue
            _log.info("store %s: applying migration %s", where, name)
            conn.executescript(script)
            for statement in dialect.version_set:
                conn.execute(statement.format(version=version))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return latest


# ---------------------------------------------------------------------------------------
# The write transaction handed to write functions.


def audit_row(event: AuditEvent) -> tuple[Any, ...]:
    """The parameters of ``AUDIT_INSERT`` for ``event`` (one place for the column order)."""
    return (
        event.at,
        event.actor,
        event.procedure,
        event.outcome,
        event.entity_id,
        event.user_id,
        event.hop,
        event.correlation_id,
        event.detail,
        event.count,
        event.source,
        event.flow_id,
    )


class _SQLWriteTx:
    """:class:`WriteTx` over the writer's connection; valid only while its job runs.

    The writer builds one per job and invalidates it when the job's function returns, so a
    function that keeps a reference cannot write outside its transaction.
    """

    __slots__ = ("_conn", "_dialect", "_sealer")

    def __init__(self, conn: _Conn, dialect: _Dialect, sealer: _Sealer) -> None:
        self._conn: _Conn | None = conn
        self._dialect = dialect
        self._sealer = sealer

    def _invalidate(self) -> None:
        self._conn = None

    def _live(self) -> _Conn:
        conn = self._conn
        if conn is None:
            raise LocalProtocolError("a WriteTx is only valid inside its write function")
        if not conn.in_transaction:
            # SQLite rolls a whole transaction back on some errors (disk full, I/O). Never
            # let a function go on writing in autocommit mode after that.
            raise StoreError("the write transaction was aborted by the database")
        return conn

    def _exec(self, statement: str, params: Sequence[Any]) -> _Cursor:
        return self._live().execute(self._dialect.sql(statement), params)

    def _exec_guarded(self, statement: str, params: Sequence[Any]) -> _Cursor:
        """:meth:`_exec` for a statement that may fail on a constraint: where a failure
        aborts the transaction (PostgreSQL) it runs in its own savepoint, so only the
        statement is undone, as on SQLite."""
        if not self._dialect.errors_abort_transaction:
            return self._exec(statement, params)
        with self._savepoint("stmt"):
            return self._exec(statement, params)

    @contextlib.contextmanager
    def _savepoint(self, name: str) -> Iterator[None]:
        """All or nothing for a multi-statement operation, even if the caller catches."""
        conn = self._live()
        conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute(f"ROLLBACK TO {name}")
                conn.execute(f"RELEASE {name}")
            raise
        conn.execute(f"RELEASE {name}")

    def add_user(self, user: UserRecord) -> None:
        """Insert a user; :class:`ConflictError` if the User ID exists."""
        sealed = self._sealer.seal("users.password_key", user.password_key, (user.user_id,))
        params = (user.user_id, sealed, user.created_at, int(user.disabled))
        try:
            cur = self._exec(_Q.USER_INSERT, params)
        except self._dialect.error as exc:
            raise StoreError(f"cannot add user {user.user_id!r}: {exc}") from None
        if cur.rowcount != 1:
            raise ConflictError(f"user {user.user_id!r} already exists")

    def set_password_key(self, user_id: str, password_key: bytes) -> None:
        """Replace a user's password key; StoreError if the user does not exist."""
        sealed = self._sealer.seal("users.password_key", password_key, (user_id,))
        try:
            cur = self._exec(_Q.USER_SET_KEY, (sealed, user_id))
        except self._dialect.error as exc:
            raise StoreError(f"cannot set the password key of {user_id!r}: {exc}") from None
        if cur.rowcount != 1:
            raise StoreError(f"no user {user_id!r}")

    def put_entity(self, entity: EntityRecord) -> None:
        """Insert or replace an entity (by Entity ID); StoreError if its owner is unknown."""
        self._write_entity(_Q.ENTITY_UPSERT, entity)

    def assign_entity(self, entity: EntityRecord, *, expected_epoch: int) -> None:
        """Store an assignment if the entity is absent or still at ``expected_epoch``
        with the same owner and kind, not revoked; :class:`ClaimConflict` otherwise."""
        if entity.epoch != expected_epoch + 1:
            raise StoreError(f"entity {entity.entity_id!r}: epoch must be expected_epoch + 1")
        if self._write_entity(_Q.ENTITY_ASSIGN, entity, expected_epoch) != 1:
            raise ClaimConflict(f"entity {entity.entity_id!r} changed since it was checked")

    def _write_entity(self, statement: str, entity: EntityRecord, *extra: Any) -> int:
        """Run an entity write (its columns, then ``extra`` parameters); the row count."""
        if any(len(k) != KEY_LEN for k in entity.eukeys):
            raise StoreError(f"EUKeys are {KEY_LEN} bytes (entity {entity.entity_id!r})")
        sealed = self._sealer.seal("entities.eukeys", b"".join(entity.eukeys), (entity.entity_id,))
        params = (
            entity.entity_id,
            int(entity.kind),
            entity.owner,
            sealed,
            entity.key_index,
            entity.assigned_via,
            entity.assigned_at,
            int(entity.revoked),
            entity.epoch,
            *extra,
        )
        try:
            return int(self._exec_guarded(statement, params).rowcount)
        except self._dialect.error as exc:
            if self._dialect.is_foreign_key_violation(exc):
                raise StoreError(
                    f"entity {entity.entity_id!r}: owner {entity.owner!r} is not a user"
                ) from None
            raise StoreError(f"cannot store entity {entity.entity_id!r}: {exc}") from None

    def put_tks(self, records: Sequence[TKRecord]) -> None:
        """Insert TK records; :class:`ConflictError` (and nothing written) on a duplicate."""
        seen: set[str] = set()
        for record in records:
            if record.entity_id in seen:
                raise ConflictError(
                    f"the batch holds two TK records for entity {record.entity_id!r}"
                )
            seen.add(record.entity_id)
        rows = [
            (
                r.entity_id,
                self._sealer.seal("tk_records.tk", r.tk, (r.entity_id,)),
                r.source,
                r.imported_at,
                r.tk_step,
            )
            for r in records
        ]
        conn = self._live()
        try:
            with self._savepoint("put_tks"):
                conn.executemany(self._dialect.sql(_Q.TK_INSERT), rows)
        except self._dialect.error as exc:
            if self._dialect.is_unique_violation(exc):
                # The savepoint undid the rows inserted before the duplicate; name it.
                for record in records:
                    if self._exec(_Q.TK_EXISTS, (record.entity_id,)).fetchone():
                        raise ConflictError(
                            f"a TK record for entity {record.entity_id!r} already exists; "
                            "nothing of the batch was written"
                        ) from None
            raise StoreError(f"cannot import TK records: {exc}") from None

    def use_nonce(self, nonce: bytes, *, expires_at: int) -> None:
        """Record a random value as used; :class:`NonceReused` if it already was."""
        try:
            cur = self._exec(_Q.NONCE_INSERT, (nonce_digest(nonce), expires_at))
        except self._dialect.error as exc:
            raise StoreError(f"cannot record a used nonce: {exc}") from None
        if cur.rowcount != 1:
            raise NonceReused("the random value was already used (replay)")

    def put_reply(self, reply: StoredReply) -> None:
        """Remember the reply to a transaction.

        The first reply stored for (requester, txid) wins: a second one raises
        :class:`ConflictError`, so two processes racing on one retried transaction cannot
        leave a reply in the store other than the one that was sent.
        """
        row: tuple[Part, ...] = (reply.requester, reply.txid)
        sealed = self._sealer.seal("replies.reply", reply.reply, row)
        params = (reply.requester, reply.txid, reply.request_digest, sealed, reply.created_at)
        try:
            cur = self._exec(_Q.REPLY_INSERT, params)
        except self._dialect.error as exc:
            raise StoreError(f"cannot store a reply: {exc}") from None
        if cur.rowcount != 1:
            raise ConflictError(
                f"a reply to transaction {reply.txid.hex()} of {reply.requester!r} "
                "is already stored"
            )

    def audit(self, event: AuditEvent) -> None:
        """Append an audit event."""
        params = audit_row(event)
        try:
            self._exec(_Q.AUDIT_INSERT, params)
        except self._dialect.error as exc:
            raise StoreError(f"cannot append an audit event: {exc}") from None

    def audit_many(self, events: Sequence[AuditEvent]) -> None:
        """Append audit events, in order, in one batched statement."""
        if not events:
            return
        try:
            self._live().executemany(
                self._dialect.sql(_Q.AUDIT_INSERT), [audit_row(e) for e in events]
            )
        except self._dialect.error as exc:
            raise StoreError(f"cannot append audit events: {exc}") from None

    def set_revoked(self, entity_id: str, revoked: bool) -> None:
        """Revoke or restore an entity; StoreError if it does not exist."""
        try:
            cur = self._exec(_Q.ENTITY_SET_REVOKED, (int(revoked), entity_id))
        except self._dialect.error as exc:
            raise StoreError(f"cannot revoke {entity_id!r}: {exc}") from None
        if cur.rowcount != 1:
            raise StoreError(f"no entity {entity_id!r}")

    def record_auth_failure(self, user_id: str, *, now: int, window: int, count: int = 1) -> None:
        """Count failed password proofs (see :class:`~cpns.store.base.WriteTx`)."""
        if count < 1:
            raise LocalProtocolError("count must be >= 1")
        try:
            self._exec(_Q.AUTH_FAILURE_UPSERT, (user_id, count, now + window, now))
        except self._dialect.error as exc:
            raise StoreError(f"cannot record a failed proof: {exc}") from None

    def clear_auth_failures(self, user_id: str) -> None:
        """Forget the failed proofs of ``user_id``."""
        try:
            self._exec(_Q.AUTH_FAILURE_DELETE, (user_id,))
        except self._dialect.error as exc:
            raise StoreError(f"cannot clear failed proofs: {exc}") from None

    def advance_digest_nc(
        self,
        nonce: str,
        *,
        keep_until: int,
        advance: Callable[[tuple[int, int] | None], tuple[int, int]],
    ) -> None:
        """Compare and set of a Digest nonce's counter state (see the WriteTx contract
        and :func:`_advance_nc`)."""
        try:
            _advance_nc(self._exec, nonce, keep_until=keep_until, advance=advance)
        except self._dialect.error as exc:
            raise StoreError(f"cannot record a Digest nonce count: {exc}") from None

    def put_establishment(self, establishment: PendingEstablishment) -> None:
        """Store a pending establishment, sealed; :class:`ConflictError` if its key is taken."""
        est = establishment
        if len(est.est_id) != 16:
            raise StoreError(f"est_id is 16 bytes, not {len(est.est_id)}")
        row: tuple[Part, ...] = (est.gw_id, est.est_id)
        sealed = self._sealer.seal("pn_establishments.state", encode_establishment_state(est), row)
        params = (est.gw_id, est.est_id, est.pn_id, sealed, est.created_at, est.expires_at)
        try:
            cur = self._exec(_Q.EST_INSERT, params)
        except self._dialect.error as exc:
            raise StoreError(f"cannot store a pending establishment: {exc}") from None
        if cur.rowcount != 1:
            raise ConflictError(
                f"establishment {est.est_id.hex()} of {est.gw_id!r} is already stored"
            )

    def delete_establishment(self, gateway_id: str, est_id: bytes) -> None:
        """Delete a pending establishment; :class:`ClaimConflict` if it is gone."""
        try:
            cur = self._exec(_Q.EST_DELETE, (gateway_id, est_id))
        except self._dialect.error as exc:
            raise StoreError(f"cannot delete a pending establishment: {exc}") from None
        if cur.rowcount != 1:
            raise ClaimConflict(
                f"establishment {est_id.hex()} of {gateway_id!r} is not pending (any more)"
            )

    def record_pn(
        self,
        pn_id: str,
        gateway_id: str,
        owner: str,
        now: int,
        results: Sequence[PNMember],
    ) -> None:
        """Upsert a PN and its per-PNE results (see :class:`~cpns.store.base.WriteTx`)."""
        check_pn_results(pn_id, results)
        try:
            with self._savepoint("record_pn"):
                cur = self._exec(_Q.PN_UPSERT, (pn_id, gateway_id, owner, now, now))
                if cur.rowcount != 1:
                    raise ConflictError(f"PN {pn_id!r} belongs to another user")
                self._live().executemany(
                    self._dialect.sql(_Q.PN_MEMBER_UPSERT),
                    [(pn_id, r.pne_id, r.flow, r.status, r.at) for r in results],
                )
        except self._dialect.error as exc:
            raise StoreError(f"cannot record PN {pn_id!r}: {exc}") from None

    def set_tk_state(self, entity_id: str, tk: bytes, tk_step: int, *, expected_step: int) -> None:
        """Compare and set of the TK ratchet (see :class:`~cpns.store.base.WriteTx`)."""
        check_forward("the TK step", entity_id, tk_step, expected_step)
        sealed = self._sealer.seal("tk_records.tk", tk, (entity_id,))
        try:
            cur = self._exec(_Q.TK_SET_STATE, (sealed, tk_step, entity_id, expected_step))
        except self._dialect.error as exc:
            raise StoreError(f"cannot advance the TK of {entity_id!r}: {exc}") from None
        if cur.rowcount != 1:
            raise ClaimConflict(f"the TK of {entity_id!r} is not at step {expected_step}")

    def set_key_index(self, entity_id: str, key_index: int, *, expected_index: int) -> None:
        """Compare and set of the EUKey chain index (see :class:`~cpns.store.base.WriteTx`)."""
        check_forward("the EUKey index", entity_id, key_index, expected_index)
        try:
            cur = self._exec(_Q.ENTITY_SET_INDEX, (key_index, entity_id, expected_index))
        except self._dialect.error as exc:
            raise StoreError(f"cannot advance the EUKey index of {entity_id!r}: {exc}") from None
        if cur.rowcount != 1:
            raise ClaimConflict(f"entity {entity_id!r} is not at EUKey index {expected_index}")

    def purge_audit(self, *, before: int) -> int:
        """Delete audit events older than ``before`` (epoch seconds); return how many."""
        try:
            return int(self._exec(_Q.AUDIT_PURGE, (before,)).rowcount)
        except self._dialect.error as exc:
            raise StoreError(f"cannot purge audit events: {exc}") from None

    def _purge(self, *, nonces_before: int, replies_before: int) -> int:
        try:
            gone = self._exec(_Q.NONCE_PURGE, (nonces_before,)).rowcount
            gone += self._exec(_Q.AUTH_FAILURE_PURGE, (nonces_before,)).rowcount
            gone += self._exec(_Q.DIGEST_NC_PURGE, (nonces_before,)).rowcount
            gone += self._exec(_Q.EST_PURGE, (nonces_before,)).rowcount
            gone += self._exec(_Q.REPLY_PURGE, (replies_before,)).rowcount
        except self._dialect.error as exc:
            raise StoreError(f"cannot purge expired rows: {exc}") from None
        return gone


# ---------------------------------------------------------------------------------------
# The group-commit writer.


@dataclass(frozen=True, slots=True)
class WriteStats:
    """Counters of the group-commit writer (for metrics and benchmarks)."""

    #: Transactions committed.
    commits: int
    #: Write functions committed (including ones rolled back to their savepoint).
    jobs: int

    @property
    def mean_batch(self) -> float:
        """Write functions per commit: the group-commit gain."""
        return self.jobs / self.commits if self.commits else 0.0


class _Job:
    """One write function and the future its caller waits on.

    A thread caller waits on a ``concurrent.futures.Future``; an asyncio caller awaits an
    ``asyncio.Future`` of its own loop, which only that loop may resolve (see
    :meth:`SQLStore._deliver`).
    """

    __slots__ = ("afuture", "durable", "fn", "future", "loop")

    def __init__(
        self,
        fn: Callable[[WriteTx], Any],
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        durable: bool = True,
    ) -> None:
        self.fn = fn
        self.loop = loop
        self.durable = durable
        self.future: concurrent.futures.Future[Any] | None = None
        self.afuture: asyncio.Future[Any] | None = None
        if loop is None:
            self.future = concurrent.futures.Future()
        else:
            self.afuture = loop.create_future()

    def start(self) -> bool:
        """Whether to run the job: False if its caller cancelled it while it was queued."""
        if self.future is not None:
            return self.future.set_running_or_notify_cancel()
        assert self.afuture is not None
        # Read without the loop's help: at worst a job cancelled at this very instant
        # still runs and commits, and its outcome is dropped (as after a late cancel).
        return not self.afuture.cancelled()


def _tx_advance_nc(
    tx: WriteTx,
    *,
    nonce: str,
    keep_until: int,
    advance: Callable[[tuple[int, int] | None], tuple[int, int]],
) -> None:
    tx.advance_digest_nc(nonce, keep_until=keep_until, advance=advance)


def _resolve_async(outcomes: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    """Runs on the caller's event loop: resolve that loop's futures of one commit."""
    for future, ok, value in outcomes:
        if future.cancelled():
            continue
        if ok:
            future.set_result(value)
        elif isinstance(value, StopIteration):  # a Future refuses it; asyncio does the same
            future.set_exception(RuntimeError(f"write function raised {value!r}"))
        else:
            future.set_exception(value)


_STOP: Final = object()


class _BatchAbortedError(Exception):
    """The database lost the transaction of a batch; no job of it was committed."""


class SQLStore:
    """:class:`~cpns.store.base.ServerStore` on a SQLite file or a PostgreSQL database,
    with group commit.

    Build it with :meth:`open`; call :meth:`close` (or use it as a context manager) to
    drain pending writes and release every connection. ``schema_version`` is the schema
    version after migrations; :attr:`write_stats` counts commits and write functions.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        master_key: MasterKey,
        reply_retention: int = 86400,
        busy_timeout: float = 10.0,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_readers: int = DEFAULT_MAX_READERS,
    ) -> None:
        """Open (creating and migrating if needed) the store; see :meth:`open`."""
        if reply_retention < 0:
            raise LocalProtocolError("reply_retention must be >= 0 seconds")
        if max_batch < 1:
            raise LocalProtocolError("max_batch must be >= 1")
        if isinstance(path, str) and is_dsn(path):
            self._dsn: str | None = path
            self._path: Path | None = None
            self._dialect = _POSTGRESQL
            #: How the database is named in messages and logs (never with its password).
            self._where = redact_dsn(path)
        else:
            self._dsn = None
            self._path = Path(path)
            self._dialect = _SQLITE
            self._where = str(self._path)
        self._pg_readers: PGReaders | None = None
        self._sealer = _Sealer(master_key)
        # Opened in place of a user's sealed password key when the User ID is unknown, so
        # both lookups cost the same (no user enumeration by timing, issue 5 item 7).
        self._no_user = self._sealer.seal("users.password_key", bytes(KEY_LEN), ("",))
        # The same for an unknown Entity ID (a Digest 401 must not tell it from a known one):
        # a stand-in row that get_entity decodes exactly as it decodes a found one.
        self._no_entity_row = (
            "cpns-no-entity",
            int(EntityKind.PN_GW),
            "cpns-no-owner",
            self._sealer.seal("entities.eukeys", bytes(KEY_LEN), ("cpns-no-entity",)),
            1,
            None,
            0,
            0,
            0,
        )
        self._reply_retention = reply_retention
        self._busy_timeout = busy_timeout
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._closed = False
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._stats = WriteStats(commits=0, jobs=0)
        # Operator metrics of the group commit (docs/metrics.md), bound to this back end.
        self._m_batch = metrics.STORE_COMMIT_BATCH.labels(self._dialect.name)
        self._m_duration = metrics.STORE_COMMIT_DURATION.labels(self._dialect.name)
        self._m_failures = metrics.STORE_COMMIT_FAILURES.labels(self._dialect.name)
        conn: _Conn
        try:
            if self._dsn is not None:
                conn = PGConnection.connect(self._dsn, timeout=busy_timeout)
            else:
                assert self._path is not None
                conn = _connect_sqlite(self._path, busy_timeout=busy_timeout, read_only=False)
        except self._dialect.error as exc:
            raise StoreError(f"cannot open store {self._where}: {self._scrub(exc)}") from None
        try:
            self.schema_version = _migrate(conn, self._dialect, self._where)
            self._check_master_key(conn)
            if self._dsn is not None:
                self._pg_readers = PGReaders(self._dsn, max_size=max_readers, timeout=busy_timeout)
        except self._dialect.error as exc:
            conn.close()
            raise StoreError(f"cannot initialise store {self._where}: {self._scrub(exc)}") from None
        except BaseException:
            conn.close()
            raise
        self._writer_conn = conn
        self._writer_durable = True
        name = self._path.name if self._path is not None else self._dialect.name
        self._writer = threading.Thread(
            target=self._writer_loop, name=f"cpns-store-writer:{name}", daemon=True
        )
        self._writer.start()
        _log.debug(
            "store %s open (schema %d, master key %s)",
            self._where,
            self.schema_version,
            self._sealer.key_id,
        )

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        master_key: MasterKey,
        reply_retention: int = 86400,
        busy_timeout: float = 10.0,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_readers: int = DEFAULT_MAX_READERS,
    ) -> SQLStore:
        """Open the store at ``path``, creating the file and applying migrations.

        Args:
            path: the SQLite database file (its directory must exist), or a PostgreSQL
                URL ``postgresql://user:password@host:port/dbname`` (the database must
                exist; the store creates its tables in it).
            master_key: seals and opens every secret column.
            reply_retention: seconds a stored reply is kept by :meth:`purge_expired`.
            busy_timeout: seconds to wait for another process's write lock (SQLite) or
                row lock, and to connect (PostgreSQL).
            max_batch: most jobs committed in one transaction.
            max_readers: most read connections open at once (PostgreSQL; SQLite opens
                one per reading thread).

        Raises:
            StoreError: the file cannot be opened or migrated, its schema is newer than
                this software, or it was sealed under another master key.
        """
        return cls(
            path,
            master_key=master_key,
            reply_retention=reply_retention,
            busy_timeout=busy_timeout,
            max_batch=max_batch,
            max_readers=max_readers,
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<SQLStore {self._where!r} {state} key={self._sealer.key_id}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def path(self) -> Path:
        """The database file (SQLite); :class:`StoreError` on PostgreSQL."""
        if self._path is None:
            raise StoreError(f"store {self._where} is not a file")
        return self._path

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._dialect.name

    def _scrub(self, exc: BaseException) -> str:
        """The text of a driver error, without the DSN's password."""
        return scrub(str(exc), self._dsn) if self._dsn is not None else str(exc)

    @property
    def write_stats(self) -> WriteStats:
        """Commits and write functions so far (updated by the writer after each commit)."""
        return self._stats

    def _check_master_key(self, conn: _Conn) -> None:
        """Fail now if the database was sealed under another master key."""
        q = self._dialect.sql
        row = conn.execute(q(_Q.META_GET), ("master_key_check",)).fetchone()
        if row is None:
            conn.execute(self._dialect.begin_write)
            try:
                if conn.execute(q(_Q.META_GET), ("master_key_check",)).fetchone() is None:
                    sealed = self._sealer.seal(
                        "meta.master_key_check", _KEY_CHECK_PLAINTEXT, ("master_key_check",)
                    )
                    conn.execute(q(_Q.META_INSERT), ("master_key_check", sealed))
                    conn.execute(q(_Q.META_INSERT), ("master_key_id", self._sealer.key_id.encode()))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            row = conn.execute(q(_Q.META_GET), ("master_key_check",)).fetchone()
        try:
            self._sealer.open("meta.master_key_check", bytes(row[0]), ("master_key_check",))
        except StoreError:
            id_row = conn.execute(q(_Q.META_GET), ("master_key_id",)).fetchone()
            expected = bytes(id_row[0]).decode("ascii", "replace") if id_row else "unknown"
            raise StoreError(
                f"{self._where} was sealed under master key {expected}, but the key given has "
                f"id {self._sealer.key_id}: wrong master key?"
            ) from None

    # -- reads ------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only SQLite connection, opened on first use, tracked for close."""
        if self._closed:
            raise StoreError(f"store {self._where} is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            assert self._path is not None
            try:
                conn = _connect_sqlite(self._path, busy_timeout=self._busy_timeout, read_only=True)
            except self._dialect.error as exc:
                raise StoreError(f"cannot open store {self._where} for reading: {exc}") from None
            with self._lock:
                closed = self._closed_under_lock()
                if not closed:
                    self._readers.append(conn)
            if closed:
                conn.close()
                raise StoreError(f"store {self._where} is closed")
            self._local.conn = conn
        return conn

    def _closed_under_lock(self) -> bool:
        # A method, not an inline check: close() may flip the flag between two reads.
        return self._closed

    def _query(self, statement: str, params: Sequence[Any]) -> list[Any]:
        sql = self._dialect.sql(statement)
        try:
            if self._pg_readers is None:
                return self._reader().execute(sql, params).fetchall()
            if self._closed:
                raise StoreError(f"store {self._where} is closed")
            return self._pg_readers.read(lambda c: c.execute(sql.encode(), params).fetchall())
        except self._dialect.error as exc:
            raise StoreError(f"cannot read store {self._where}: {exc}") from None

    def _user(self, row: Any) -> UserRecord:
        user_id, sealed, created_at, disabled = row
        return UserRecord(
            user_id=user_id,
            password_key=self._sealer.open("users.password_key", bytes(sealed), (user_id,)),
            created_at=created_at,
            disabled=bool(disabled),
        )

    def _entity(self, row: Any) -> EntityRecord:
        entity_id, kind, owner, sealed, key_index, assigned_via, assigned_at, revoked, epoch = row
        try:
            entity_kind = EntityKind(kind)
        except ValueError:
            raise StoreError(f"entity {entity_id!r} has unknown kind {kind}") from None
        plain = self._sealer.open("entities.eukeys", bytes(sealed), (entity_id,))
        return EntityRecord(
            entity_id=entity_id,
            kind=entity_kind,
            owner=owner,
            eukeys=_split_eukeys(plain),
            key_index=key_index,
            assigned_via=assigned_via,
            assigned_at=assigned_at,
            revoked=bool(revoked),
            epoch=epoch,
        )

    def get_user(self, user_id: str) -> UserRecord | None:
        """The user, or None; :class:`StoreError` if its sealed key does not open."""
        rows = self._query(_Q.USER_GET, (user_id,))
        if not rows:
            # The same unseal as for a known user: equal cost, equal answer time.
            self._sealer.open("users.password_key", self._no_user, ("",))
            return None
        return self._user(rows[0])

    def get_entity(self, entity_id: str) -> EntityRecord | None:
        """The entity, or None; :class:`StoreError` if its sealed EUKeys do not open."""
        rows = self._query(_Q.ENTITY_GET, (entity_id,))
        if not rows:
            self._entity(self._no_entity_row)  # the same work as for a known Entity ID
            return None
        return self._entity(rows[0])

    def get_tk(self, entity_id: str) -> TKRecord | None:
        """The TK record of a PNE, or None; :class:`StoreError` if the TK does not open."""
        rows = self._query(_Q.TK_GET, (entity_id,))
        if not rows:
            return None
        return self._tk(rows[0])

    def _tk(self, row: Any) -> TKRecord:
        eid, sealed, source, imported_at, tk_step = row
        return TKRecord(
            entity_id=eid,
            tk=self._sealer.open("tk_records.tk", bytes(sealed), (eid,)),
            source=source,
            imported_at=imported_at,
            tk_step=tk_step,
        )

    def get_entities(self, entity_ids: Sequence[str]) -> dict[str, EntityRecord]:
        """The entities of ``entity_ids`` that exist, by Entity ID, in one query (at most
        :data:`MAX_BATCH_READ` IDs per query); each unknown ID costs the same unseal as in
        :meth:`get_entity`. :class:`StoreError` if a sealed chain does not open."""
        found: dict[str, EntityRecord] = {}
        wanted = list(dict.fromkeys(entity_ids))
        for rows in self._query_in(_Q.ENTITIES_GET_IN, wanted):
            for row in rows:
                record = self._entity(row)
                found[record.entity_id] = record
        for _missing in range(len(wanted) - len(found)):
            self._entity(self._no_entity_row)
        return found

    def get_tks(self, entity_ids: Sequence[str]) -> dict[str, TKRecord]:
        """The TK records of ``entity_ids`` that exist, by Entity ID, in one query (at most
        :data:`MAX_BATCH_READ` IDs per query)."""
        found: dict[str, TKRecord] = {}
        for rows in self._query_in(_Q.TKS_GET_IN, list(dict.fromkeys(entity_ids))):
            for row in rows:
                record = self._tk(row)
                found[record.entity_id] = record
        return found

    def _query_in(self, statement: str, keys: list[str]) -> Iterator[list[Any]]:
        """The rows of ``statement`` (ending in ``IN ({})``) for ``keys``, a query per
        :data:`MAX_BATCH_READ` of them."""
        for start in range(0, len(keys), MAX_BATCH_READ):
            chunk = keys[start : start + MAX_BATCH_READ]
            yield self._query(statement.format(", ".join("?" * len(chunk))), chunk)

    def get_establishment(self, gateway_id: str, est_id: bytes) -> PendingEstablishment | None:
        """The pending establishment, or None; :class:`StoreError` if it does not open."""
        rows = self._query(_Q.EST_GET, (gateway_id, est_id))
        if not rows:
            return None
        gw, est, pn_id, sealed, created_at, expires_at = rows[0]
        est = bytes(est)
        plain = self._sealer.open("pn_establishments.state", bytes(sealed), (gw, est))
        return decode_establishment_state(
            plain, gw_id=gw, est_id=est, pn_id=pn_id, created_at=created_at, expires_at=expires_at
        )

    def get_pn(self, pn_id: str) -> PNRecord | None:
        """The PN with its members and failures, or None."""
        found = _pn_records(self._query(_Q.PN_GET, (pn_id,)))
        return found[0] if found else None

    def get_pn_owner(self, pn_id: str) -> str | None:
        """The CPNS User owning the PN, or None if there is no such PN (one row read, not
        its members)."""
        rows = self._query(_Q.PN_OWNER, (pn_id,))
        return str(rows[0][0]) if rows else None

    def list_pns(self, *, owner: str | None = None, gateway: str | None = None) -> list[PNRecord]:
        """All PNs (optionally of one owner and/or one PN GW), ordered by PN ID."""
        if owner is not None and gateway is not None:
            rows = self._query(_Q.PN_LIST_BOTH, (owner, gateway))
        elif owner is not None:
            rows = self._query(_Q.PN_LIST_OWNER, (owner,))
        elif gateway is not None:
            rows = self._query(_Q.PN_LIST_GATEWAY, (gateway,))
        else:
            rows = self._query(_Q.PN_LIST, ())
        return _pn_records(rows)

    def get_reply(self, requester: str, txid: bytes) -> StoredReply | None:
        """The stored reply of a transaction, or None."""
        rows = self._query(_Q.REPLY_GET, (requester, txid))
        if not rows:
            return None
        req, tx, digest, sealed, created_at = rows[0]
        tx = bytes(tx)
        return StoredReply(
            requester=req,
            txid=tx,
            request_digest=bytes(digest),
            reply=self._sealer.open("replies.reply", bytes(sealed), (req, tx)),
            created_at=created_at,
        )

    def nonce_used(self, nonce: bytes) -> bool:
        """Whether a random value was recorded as used and not purged yet.

        A used nonce stays "used" until :meth:`purge_expired` removes it after its
        ``expires_at``, which errs on the side of refusing a replay.
        """
        return bool(self._query(_Q.NONCE_EXISTS, (nonce_digest(nonce),)))

    def auth_failures(self, user_id: str, *, now: int) -> int:
        """Failed password proofs of ``user_id`` still counted at ``now``."""
        rows = self._query(_Q.AUTH_FAILURE_GET, (user_id, now))
        return int(rows[0][0]) if rows else 0

    def list_entities(self, *, owner: str | None = None) -> list[EntityRecord]:
        """All entities (optionally of one owner), ordered by Entity ID."""
        if owner is None:
            rows = self._query(_Q.ENTITY_LIST, ())
        else:
            rows = self._query(_Q.ENTITY_LIST_OWNER, (owner,))
        return [self._entity(r) for r in rows]

    def list_users(self) -> list[UserRecord]:
        """All users, ordered by User ID."""
        return [self._user(r) for r in self._query(_Q.USER_LIST, ())]

    def audit_events(self, *, limit: int = 100) -> list[AuditEvent]:
        """The newest audit events, newest first (at most ``limit``)."""
        if limit <= 0:
            return []
        return [_audit_event(row) for row in self._query(_Q.AUDIT_LIST, (limit,))]

    def ping(self) -> None:
        """One real read of the database, as a readiness check (``/readyz``).

        SQLite: a fresh read-only connection opens the file (never creating it) and reads
        the master key id, so a file that went missing or unreadable fails now, not only
        in the next request. PostgreSQL: the same read on a pooled connection.

        Raises:
            StoreError: the database cannot be read (the message names it, no password).
        """
        if self._closed:
            raise StoreError(f"store {self._where} is closed")
        statement = self._dialect.sql(_Q.META_GET)
        if self._pg_readers is not None:
            self._query(_Q.META_GET, ("master_key_id",))
            return
        assert self._path is not None
        uri = "file:" + urllib.parse.quote(str(self._path.resolve())) + "?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=self._busy_timeout, autocommit=True)
            try:
                row = conn.execute(statement, ("master_key_id",)).fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read store {self._where}: {exc}") from None
        if row is None:
            raise StoreError(f"store {self._where} has no master key id (not a cpns store?)")

    # -- writes -----------------------------------------------------------------------

    def _submit(self, job: _Job) -> None:
        if threading.current_thread() is self._writer:
            raise LocalProtocolError("write() called from inside a write function")
        with self._lock:
            if self._closed:
                raise StoreError(f"store {self._where} is closed")
            self._queue.put(job)

    def write[T](self, fn: Callable[[WriteTx], T]) -> T:
        """Run ``fn`` in one durable transaction (group-committed); return its result.

        Blocks the calling thread until the commit that includes ``fn`` is on disk.
        ``fn`` runs on the writer thread, inside its own savepoint: if it raises, its
        changes are undone, the exception is re-raised here, and other writes of the same
        commit are unaffected. ``fn`` must not block or call :meth:`write` itself.

        Raises:
            Whatever ``fn`` raises; :class:`StoreError` if the store is closed or the
            commit fails (then nothing of ``fn`` was written).
        """
        job = _Job(fn)
        self._submit(job)
        assert job.future is not None
        result: T = job.future.result()
        return result

    def write_async[T](
        self, fn: Callable[[WriteTx], T], *, durable: bool = True
    ) -> asyncio.Future[T]:
        """:meth:`write` for asyncio callers: the returned future resolves after the commit.

        Call it from a coroutine (it needs the running loop). The event loop is never
        blocked: after each commit the writer hands the outcomes of that loop's jobs back
        with ONE ``call_soon_threadsafe``, however many jobs the commit held. Cancelling
        the future before the writer picks the job up drops the job; once it has run, it
        commits regardless.

        ``durable=False`` (state whose loss is harmless, e.g. the Digest nc guard): the
        commit is atomic and visible at once but not waited on to reach the disk
        (SQLite ``synchronous=NORMAL``, PostgreSQL ``synchronous_commit = off`` for that
        transaction). A batch holding any durable job is durable as a whole.
        """
        job = _Job(fn, asyncio.get_running_loop(), durable=durable)
        self._submit(job)
        assert job.afuture is not None
        return job.afuture

    async def record_digest_nc(
        self,
        nonce: str,
        *,
        keep_until: int,
        advance: Callable[[tuple[int, int] | None], tuple[int, int]],
    ) -> None:
        """Record an accepted Digest (nonce, nc): :meth:`WriteTx.advance_digest_nc` in a
        transaction of its own, committed (visible to every process) but not waited on to
        reach the disk; whatever ``advance`` raises (a replayed nc) is raised here.

        SQLite: a ``durable=False`` job of the group-commit writer (the file's write lock
        makes the compare and set trivially atomic). PostgreSQL: a short transaction on a
        pooled connection, in a worker thread, touching that one row only: it neither
        queues behind the writer's batches nor holds the row's lock while a batch runs
        other jobs, so two processes can never deadlock on two nonces.
        """
        if self._pg_readers is None:
            await self.write_async(
                functools.partial(
                    _tx_advance_nc, nonce=nonce, keep_until=keep_until, advance=advance
                ),
                durable=False,
            )
            return
        await asyncio.to_thread(self._record_nc_pg, nonce, keep_until, advance)

    def _record_nc_pg(
        self,
        nonce: str,
        keep_until: int,
        advance: Callable[[tuple[int, int] | None], tuple[int, int]],
    ) -> None:
        assert self._pg_readers is not None
        if self._closed:
            raise StoreError(f"store {self._where} is closed")
        dialect = self._dialect
        try:
            with self._pg_readers.connection() as conn:
                # The pool's sessions default to read-only: this one transaction writes.
                conn.execute(b"BEGIN READ WRITE; " + _PG_RELAXED_COMMIT)
                try:
                    _advance_nc(
                        lambda st, params: conn.execute(dialect.sql(st).encode(), params),
                        nonce,
                        keep_until=keep_until,
                        advance=advance,
                    )
                except BaseException:
                    conn.execute(b"ROLLBACK")
                    raise
                conn.execute(b"COMMIT")
        except dialect.error as exc:
            raise StoreError(f"cannot record a Digest nonce count: {self._scrub(exc)}") from None

    def purge_expired(self, *, now: int) -> int:
        """Delete nonces whose ``expires_at`` < ``now`` and replies older than the retention.

        Returns:
            How many rows were deleted.
        """

        def purge(tx: WriteTx) -> int:
            assert isinstance(tx, _SQLWriteTx)
            return tx._purge(nonces_before=now, replies_before=now - self._reply_retention)

        return self.write(purge)

    # -- the writer thread --------------------------------------------------------------

    def _writer_loop(self) -> None:
        conn = self._writer_conn
        try:
            stop = False
            while not stop:
                item = self._queue.get()
                if item is _STOP:
                    break
                assert isinstance(item, _Job)
                batch = [item]
                while len(batch) < self._max_batch:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stop = True
                        break
                    assert isinstance(item, _Job)
                    batch.append(item)
                self._run_batch(conn, batch)
                if isinstance(conn, PGConnection) and conn.unusable:
                    conn = self._reconnect_writer(conn)
        finally:
            conn.close()

    def _reconnect_writer(self, conn: PGConnection) -> PGConnection:
        """A new writer connection for a lost one (PostgreSQL restarted, failed over).

        One attempt per failed batch: while the database is down every batch fails at
        once with a :class:`StoreError` (the server answers 503 and its clients retry), and
        the first batch after it is back runs on a new connection. Nothing is retried
        here: a batch whose COMMIT was cut may or may not have landed, and the callers'
        idempotent retries (stored replies keyed by txid) settle it."""
        assert self._dsn is not None
        try:
            fresh = PGConnection.connect(self._dsn, timeout=self._busy_timeout)
        except self._dialect.error as exc:
            _log.warning(
                "store %s: writer connection lost, reconnect failed: %s",
                self._where,
                self._scrub(exc),
            )
            return conn
        with contextlib.suppress(*self._dialect.error):
            conn.close()
        self._writer_conn = fresh
        self._writer_durable = True  # a new session starts with synchronous_commit on
        _log.warning("store %s: writer connection lost; reconnected", self._where)
        return fresh

    def _run_batch(self, conn: _Conn, batch: list[_Job]) -> None:
        """One transaction for the whole batch; each caller resolved after the COMMIT."""
        jobs = [job for job in batch if job.start()]
        if not jobs:
            return
        outcomes: list[tuple[_Job, bool, Any]] = []
        started = time.perf_counter()
        try:
            try:
                self._begin(conn, durable=any(job.durable for job in jobs))
                for job in jobs:
                    outcomes.append((job, *self._run_job(conn, job)))
                conn.execute("COMMIT")
            except self._dialect.error as exc:
                raise _BatchAbortedError(str(exc)) from exc
        except BaseException as exc:  # never let the writer die with callers waiting
            if conn.in_transaction:
                with contextlib.suppress(*self._dialect.error):
                    conn.execute("ROLLBACK")
            if isinstance(exc, _BatchAbortedError):
                _log.error("store %s: write transaction failed: %s", self._where, exc)
                reason = f"write transaction on {self._where} failed: {exc}"
            else:
                _log.exception("store %s: writer failed", self._where)
                reason = f"store writer failed: {exc!r}"
            # Nothing was committed: jobs that raised keep their own error, the rest fail.
            own = {id(job): value for job, ok, value in outcomes if not ok}
            outcomes = [(job, False, own.get(id(job)) or StoreError(reason)) for job in jobs]
            self._m_failures.inc()
        else:
            self._m_duration.observe(time.perf_counter() - started)
            self._m_batch.observe(len(jobs))
            self._stats = WriteStats(
                commits=self._stats.commits + 1, jobs=self._stats.jobs + len(jobs)
            )
        self._deliver(outcomes)

    def _begin(self, conn: _Conn, *, durable: bool) -> None:
        """Begin the batch's transaction, flushed at commit or (``durable=False``) not."""
        switch = self._dialect.durability_switch
        if switch and durable != self._writer_durable:
            conn.execute(switch[durable])
            self._writer_durable = durable
        conn.execute(self._dialect.begin_write)
        if not durable and self._dialect.relax_in_transaction is not None:
            conn.execute(self._dialect.relax_in_transaction)

    def _deliver(self, outcomes: list[tuple[_Job, bool, Any]]) -> None:
        """Resolve every caller of a batch: threads directly, each event loop in one call."""
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]]
        per_loop = {}
        for job, ok, value in outcomes:
            if job.future is not None:
                if ok:
                    job.future.set_result(value)
                else:
                    job.future.set_exception(value)
            elif job.loop is not None and job.afuture is not None:
                per_loop.setdefault(job.loop, []).append((job.afuture, ok, value))
        for loop, items in per_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_async, items)
            except RuntimeError:  # the loop is closed: no one is waiting any more
                _log.debug("store %s: outcome for a closed event loop dropped", self._where)

    def _run_job(self, conn: _Conn, job: _Job) -> tuple[bool, Any]:
        """Run one job in its own savepoint; (True, result) or (False, exception)."""
        conn.execute("SAVEPOINT job")
        tx = _SQLWriteTx(conn, self._dialect, self._sealer)
        try:
            result = job.fn(tx)
        except BaseException as exc:  # delivered to the job's caller, never swallowed
            tx._invalidate()
            if not conn.in_transaction:
                raise _BatchAbortedError(f"transaction lost in a write function: {exc!r}") from exc
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            return False, exc
        tx._invalidate()
        if not conn.in_transaction:
            raise _BatchAbortedError("transaction lost in a write function")
        conn.execute("RELEASE job")
        return True, result

    # -- shutdown -----------------------------------------------------------------------

    def close(self) -> None:
        """Commit pending writes, stop the writer thread and close every connection.

        Idempotent. Reads and writes after close raise :class:`StoreError`.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._writer.join()
        with self._lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        if self._pg_readers is not None:
            self._pg_readers.close()


if TYPE_CHECKING:

    def _satisfies_protocols(store: SQLStore, tx: _SQLWriteTx) -> tuple[ServerStore, WriteTx]:
        """Let mypy check SQLStore and its write transaction against the contract."""
        return store, tx
