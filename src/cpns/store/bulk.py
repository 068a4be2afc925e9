"""Bulk writes and maintenance access to the SQL store (imports, backup, rotation).

The server's own writes go through :class:`cpns.store.sql.SQLStore`'s group-commit writer,
one small job at a time. Operator tasks that touch a million rows at once (TK and user
imports, restoring a backup, re-sealing every secret under a new master key) need
something else:

* **Seal before locking.** Sealing a value costs about 15 us; a million of them take
  seconds. The rows are sealed in the operator's process *before* the write transaction
  starts, so the database's write lock (SQLite) is held only for the inserts.
* **Batched inserts.** :func:`insert_rows` sends rows with ``executemany`` in batches on
  SQLite and with ``COPY ... FROM STDIN`` on PostgreSQL, the fastest path each engine has.
* **One transaction, all or nothing.** An import is written in ONE transaction
  (:func:`write_transaction`): a bad or duplicate row leaves the database unchanged. On
  SQLite a server running at the same time waits for that transaction's write lock (its
  ``busy_timeout`` is 10 s; a million-row import holds the lock for a few seconds, see
  docs/operations.md); on PostgreSQL nothing waits (MVCC, row locks only).

The connections opened here are plain ones with the store's settings (WAL and
``synchronous=FULL`` on SQLite, ``synchronous_commit=on`` on PostgreSQL). Opening goes
through :class:`SQLStore` first, which applies migrations and checks the master key, so a
bulk write never runs on a database of another schema or sealed under another key.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import psycopg

from cpns.errors import StoreError
from cpns.records import AuditEvent, EntityRecord, TKRecord, UserRecord
from cpns.store.base import ConflictError
from cpns.store.postgres import PGConnection, is_dsn, redact_dsn, scrub
from cpns.store.sql import (
    _POSTGRESQL,
    _Q,
    _SQLITE,
    SQLStore,
    _Conn,
    _connect_sqlite,
    _Dialect,
    _Sealer,
    audit_row,
)

__all__ = [
    "BATCH",
    "append_audit",
    "Progress",
    "RawDB",
    "import_entities",
    "import_tks",
    "import_users",
    "insert_rows",
    "open_raw",
    "open_target",
]

#: Rows per ``executemany`` call and per progress step.
BATCH: Final = 10_000
#: Most ``?`` placeholders in one ``IN (...)`` lookup (SQLite's limit is far higher).
_LOOKUP: Final = 500

#: ``progress(phase, rows_done_now, total_rows)``: called as work advances, per batch.
Progress = Callable[[str, int, int], None]


@dataclass(slots=True)
class RawDB:
    """A plain write connection to a store's database, for maintenance work."""

    conn: _Conn
    dialect: _Dialect
    #: How the database is named in messages (no password).
    where: str

    def sql(self, statement: str) -> str:
        """``statement`` with the driver's placeholders."""
        return self.dialect.sql(statement)

    @property
    def is_postgresql(self) -> bool:
        """Whether this is a PostgreSQL database."""
        return self.dialect is _POSTGRESQL


def _target(store: SQLStore) -> str:
    return store._dsn if store._dsn is not None else str(store._path)


@contextlib.contextmanager
def open_raw(store: SQLStore) -> Iterator[RawDB]:
    """A plain write connection to ``store``'s database (migrated, key checked at open)."""
    target = _target(store)
    try:
        if store._dsn is not None:
            conn: _Conn = PGConnection.connect(target, timeout=store._busy_timeout)
        else:
            assert store._path is not None
            conn = _connect_sqlite(store._path, busy_timeout=store._busy_timeout, read_only=False)
    except store._dialect.error as exc:
        raise StoreError(f"cannot open store {store._where}: {store._scrub(exc)}") from None
    try:
        yield RawDB(conn, store._dialect, store._where)
    finally:
        conn.close()


_OPEN_ERRORS: Final[tuple[type[Exception], ...]] = (sqlite3.Error, psycopg.Error)


@contextlib.contextmanager
def open_target(target: str, busy_timeout: float = 10.0) -> Iterator[RawDB]:
    """A plain write connection to ``target`` (a SQLite file name or a URL), which need
    not open as a :class:`SQLStore` (restore: its meta rows may be sealed under the key
    of a fresh ``cpns server init``; rotation: the key is being changed)."""
    try:
        if is_dsn(target):
            conn: Any = PGConnection.connect(target, timeout=busy_timeout)
            db = RawDB(conn, _POSTGRESQL, redact_dsn(target))
        else:
            conn = _connect_sqlite(Path(target), busy_timeout=busy_timeout, read_only=False)
            db = RawDB(conn, _SQLITE, target)
    except _OPEN_ERRORS as exc:
        text = scrub(str(exc), target) if is_dsn(target) else str(exc)
        raise StoreError(f"cannot open {redact_dsn(target)}: {text}") from None
    try:
        yield db
    finally:
        conn.close()


@contextlib.contextmanager
def write_transaction(db: RawDB) -> Iterator[None]:
    """One write transaction (the write lock taken up front on SQLite); commit or roll back."""
    db.conn.execute(db.dialect.begin_write)
    try:
        yield
        db.conn.execute("COMMIT")
    except BaseException:
        if db.conn.in_transaction:
            with contextlib.suppress(*db.dialect.error):
                db.conn.execute("ROLLBACK")
        raise


_IDENT: Final = re.compile(r"[a-z_][a-z0-9_]*")


def ident(*names: str) -> None:
    """Refuse anything but a plain lowercase SQL name: table and column names are spliced
    into statements, so only the store's own names may get there."""
    for name in names:
        if _IDENT.fullmatch(name) is None:
            raise StoreError(f"not a table or column name of the store: {name!r}")


def _batches[T](items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def insert_rows(
    db: RawDB,
    table: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    progress: Progress | None = None,
    total: int = 0,
    phase: str = "writing",
) -> int:
    """Insert ``rows`` into ``table`` (inside the caller's transaction); return how many.

    ``executemany`` in batches of :data:`BATCH` on SQLite, one ``COPY ... FROM STDIN`` on
    PostgreSQL. ``table`` and ``columns`` are the store's own names, never user input.
    A constraint violation raises the driver's error (the caller's transaction is then
    to be rolled back).
    """
    ident(table, *columns)
    count = 0
    if isinstance(db.conn, PGConnection):
        with db.conn.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for batch in _batches(rows, BATCH):
                for row in batch:
                    copy.write_row(row)
                count += len(batch)
                if progress is not None:
                    progress(phase, len(batch), total)
        return count
    marks = ", ".join("?" * len(columns))
    statement = db.sql(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})")  # noqa: S608 (names checked)
    for batch in _batches(rows, BATCH):
        db.conn.executemany(statement, batch)
        count += len(batch)
        if progress is not None:
            progress(phase, len(batch), total)
    return count


def existing_keys(db: RawDB, table: str, column: str, keys: Sequence[str]) -> list[str]:
    """Which of ``keys`` are already in ``table.column`` (checked in chunks)."""
    ident(table, column)
    found: list[str] = []
    for chunk in _batches(keys, _LOOKUP):
        marks = ", ".join("?" * len(chunk))
        rows = db.conn.execute(
            db.sql(f"SELECT {column} FROM {table} WHERE {column} IN ({marks})"),  # noqa: S608
            chunk,
        ).fetchall()
        found.extend(str(r[0]) for r in rows)
    return found


def append_audit(db: RawDB, event: AuditEvent) -> None:
    """Append an audit event inside the caller's transaction."""
    db.conn.execute(db.sql(_Q.AUDIT_INSERT), audit_row(event))


def _sealed[T](
    items: Sequence[T], seal: Callable[[T], tuple[Any, ...]], progress: Progress | None
) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for batch in _batches(items, BATCH):
        rows.extend(seal(item) for item in batch)
        if progress is not None:
            progress("sealing", len(batch), len(items))
    return rows


def _bulk_write(
    store: SQLStore,
    *,
    table: str,
    key_column: str,
    what: str,
    keys: Sequence[str],
    columns: Sequence[str],
    rows: list[tuple[Any, ...]],
    audit: AuditEvent | None,
    progress: Progress | None,
) -> int:
    """Insert pre-sealed rows in one transaction, refusing the lot on an existing key."""
    with open_raw(store) as db:
        try:
            with write_transaction(db):
                clash = existing_keys(db, table, key_column, keys)
                if clash:
                    raise ConflictError(
                        f"{what} {clash[0]!r} already exists"
                        + (f" (and {len(clash) - 1} more)" if len(clash) > 1 else "")
                        + "; nothing was imported"
                    )
                count = insert_rows(db, table, columns, rows, progress=progress, total=len(rows))
                if audit is not None:
                    append_audit(db, audit)
        except db.dialect.error as exc:
            if db.dialect.is_unique_violation(exc):
                raise ConflictError(
                    f"a {what} of this import was added by someone else meanwhile; "
                    "nothing was imported"
                ) from None
            if db.dialect.is_foreign_key_violation(exc):
                raise StoreError(f"cannot import: {what} refers to an unknown user") from None
            raise StoreError(f"cannot import into {db.where}: {store._scrub(exc)}") from None
        if db.is_postgresql:
            # Fresh planner statistics now rather than at autovacuum's next round: a
            # table that grew from empty to a million rows in one COPY.
            with contextlib.suppress(*db.dialect.error):
                db.conn.execute(f"ANALYZE {table}")
    return count


def _check_unique(keys: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise ConflictError(f"the batch holds {what} {key!r} twice")
        seen.add(key)


def import_tks(
    store: SQLStore,
    records: Sequence[TKRecord],
    *,
    audit: AuditEvent | None = None,
    progress: Progress | None = None,
) -> int:
    """Insert TK records all or nothing; :class:`ConflictError` if one already exists."""
    keys = [r.entity_id for r in records]
    _check_unique(keys, "TK record")
    sealer: _Sealer = store._sealer
    rows = _sealed(
        records,
        lambda r: (
            r.entity_id,
            sealer.seal("tk_records.tk", r.tk, (r.entity_id,)),
            r.source,
            r.imported_at,
            r.tk_step,
        ),
        progress,
    )
    return _bulk_write(
        store,
        table="tk_records",
        key_column="entity_id",
        what="TK record for entity",
        keys=keys,
        columns=("entity_id", "tk_sealed", "source", "imported_at", "tk_step"),
        rows=rows,
        audit=audit,
        progress=progress,
    )


def import_users(
    store: SQLStore,
    users: Sequence[UserRecord],
    *,
    audit: AuditEvent | None = None,
    progress: Progress | None = None,
) -> int:
    """Insert users (password keys already derived) all or nothing."""
    keys = [u.user_id for u in users]
    _check_unique(keys, "user")
    sealer: _Sealer = store._sealer
    rows = _sealed(
        users,
        lambda u: (
            u.user_id,
            sealer.seal("users.password_key", u.password_key, (u.user_id,)),
            u.created_at,
            int(u.disabled),
        ),
        progress,
    )
    return _bulk_write(
        store,
        table="users",
        key_column="user_id",
        what="user",
        keys=keys,
        columns=("user_id", "password_key_sealed", "created_at", "disabled"),
        rows=rows,
        audit=audit,
        progress=progress,
    )


def import_entities(
    store: SQLStore,
    entities: Sequence[EntityRecord],
    *,
    audit: AuditEvent | None = None,
    progress: Progress | None = None,
) -> int:
    """Insert entities with their EUKeys all or nothing (provisioning, benchmarks)."""
    keys = [e.entity_id for e in entities]
    _check_unique(keys, "entity")
    sealer: _Sealer = store._sealer
    rows = _sealed(
        entities,
        lambda e: (
            e.entity_id,
            int(e.kind),
            e.owner,
            sealer.seal("entities.eukeys", b"".join(e.eukeys), (e.entity_id,)),
            e.key_index,
            e.assigned_via,
            e.assigned_at,
            int(e.revoked),
            e.epoch,
        ),
        progress,
    )
    return _bulk_write(
        store,
        table="entities",
        key_column="entity_id",
        what="entity",
        keys=keys,
        columns=(
            "entity_id",
            "kind",
            "owner",
            "eukeys_sealed",
            "key_index",
            "assigned_via",
            "assigned_at",
            "revoked",
            "epoch",
        ),
        rows=rows,
        audit=audit,
        progress=progress,
    )


# Re-exported for the other maintenance modules (dump, rotation): one place for the
# dialect objects outside sql.py.
SQLITE: Final = _SQLITE
POSTGRESQL: Final = _POSTGRESQL
