"""Master-key rotation: re-seal every secret of the store under a new master key.

Every secret column (:data:`SEALED`) and the ``meta`` key check are sealed under the
master key (:mod:`cpns.store.sql`). Rotation replaces that key without a moment where the
server could not start:

1. The new key is written to ``<key file>.new`` (0600, atomic, never overwriting).
2. In ONE database transaction every sealed value is opened under the old key and sealed
   under the new one, and the ``meta`` rows (key check, key ID) are rewritten: the
   database switches from the old key to the new one at the COMMIT, all at once.
3. ``<key file>.new`` is renamed over ``<key file>`` (atomic) and the directory fsynced.

A crash before step 2 commits leaves the database under the old key, which is still in
the key file: the server starts as before (a stray ``.new`` file is replaced by the next
rotation). A crash after the commit but before step 3 leaves the database under the new
key while the key file still holds the old one: :func:`open_store_rotating` (what the
server and ``cpns admin`` open the store with) then finds that the database opens under
``<key file>.new`` and finishes step 3 itself. So at every point the server starts, with
one of the two keys.

What else depends on the master key: the server derives its Digest nonce key from it
(``cpns.server.main``), so nonces handed out before a rotation are answered
``stale=true`` afterwards and clients retry with a fresh one. Every server process of the
database must be stopped for a rotation (a process still holding the old key can no
longer open the re-sealed rows). The local key stores of PN GWs and PNEs have their own
keys and are not concerned.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cpns.errors import ConfigurationError, StoreError
from cpns.records import AuditEvent
from cpns.runtime import wall_time
from cpns.store.bulk import (
    BATCH,
    Progress,
    RawDB,
    append_audit,
    ident,
    open_target,
    write_transaction,
)
from cpns.store.masterkey import MasterKey, fsync_directory
from cpns.store.sql import _KEY_CHECK_PLAINTEXT, _Q, SQLStore, _Sealer

__all__ = [
    "SEALED",
    "SealedColumn",
    "finish_rotation",
    "new_key_path",
    "open_store_rotating",
    "reseal",
    "rotate",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SealedColumn:
    """A column of sealed values: where it is, its sealing purpose, its row binding."""

    table: str
    column: str
    #: ``table.column`` as given to the sealer (purpose ``store/<name>``).
    purpose: str
    #: Primary key columns: the associated data of each sealed value, and the order in
    #: which rotation walks the table.
    key: tuple[str, ...]


#: Every sealed column of the store. A ``*_sealed`` column missing here makes rotation
#: refuse to run (see :func:`_check_coverage`), so a new secret column cannot be left
#: sealed under a key that rotation throws away.
SEALED: Final = (
    SealedColumn("users", "password_key_sealed", "users.password_key", ("user_id",)),
    SealedColumn("entities", "eukeys_sealed", "entities.eukeys", ("entity_id",)),
    SealedColumn("tk_records", "tk_sealed", "tk_records.tk", ("entity_id",)),
    SealedColumn("replies", "reply_sealed", "replies.reply", ("requester", "txid")),
    SealedColumn(
        "pn_establishments",
        "state_sealed",
        "pn_establishments.state",
        ("gateway_id", "est_id"),
    ),
)


def new_key_path(key_file: Path) -> Path:
    """Where a rotation writes the new key before it takes over: ``<key file>.new``."""
    return key_file.with_name(key_file.name + ".new")


def _sealed_columns_in_schema(db: RawDB) -> set[tuple[str, str]]:
    if db.is_postgresql:
        rows = db.conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND column_name LIKE '%%\\_sealed'"
        ).fetchall()
        return {(str(t), str(c)) for t, c in rows}
    found: set[tuple[str, str]] = set()
    tables = db.conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    ).fetchall()
    for (table,) in tables:
        ident(str(table))
        for row in db.conn.execute(f"PRAGMA table_info({table})").fetchall():
            if str(row[1]).endswith("_sealed"):
                found.add((str(table), str(row[1])))
    return found


def _check_coverage(db: RawDB) -> None:
    known = {(c.table, c.column) for c in SEALED}
    unknown = sorted(_sealed_columns_in_schema(db) - known)
    if unknown:
        names = ", ".join(f"{t}.{c}" for t, c in unknown)
        raise StoreError(
            f"the database has sealed columns this rotation does not know ({names}); "
            "nothing was changed"
        )


def _walk(db: RawDB, col: SealedColumn) -> Iterator[list[tuple[Any, ...]]]:
    """The rows (key..., sealed) of a column in key order, BATCH at a time (keyset pages:
    the table is updated while it is walked, so no cursor stays open across updates)."""
    ident(col.table, col.column, *col.key)
    keys = ", ".join(col.key)
    select = f"SELECT {keys}, {col.column} FROM {col.table}"  # noqa: S608 (names checked)
    first = db.sql(f"{select} ORDER BY {keys} LIMIT {BATCH}")
    after = db.sql(
        f"{select} WHERE ({keys}) > ({', '.join('?' * len(col.key))}) ORDER BY {keys} LIMIT {BATCH}"
    )
    rows = db.conn.execute(first).fetchall()
    while rows:
        yield [tuple(r) for r in rows]
        if len(rows) < BATCH:
            return
        rows = db.conn.execute(after, rows[-1][: len(col.key)]).fetchall()


def _context(row: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)


def reseal(
    target: str,
    old: MasterKey,
    new: MasterKey,
    *,
    progress: Progress | None = None,
) -> dict[str, int]:
    """Re-seal every secret of the database ``target`` from ``old`` to ``new`` in ONE
    transaction (with the ``meta`` key check and key ID); return the rows per table.

    Raises:
        StoreError: the database is not sealed under ``old``, has sealed columns this
            code does not know, or a value does not open; nothing is changed then.
    """
    opener, sealer = _Sealer(old), _Sealer(new)
    counts: dict[str, int] = {}
    with open_target(target) as db:
        try:
            with write_transaction(db):
                check = db.conn.execute(db.sql(_Q.META_GET), ("master_key_check",)).fetchone()
                if check is None:
                    raise StoreError(f"{db.where} has no master key check; is it a cpns store?")
                opener.open("meta.master_key_check", bytes(check[0]), ("master_key_check",))
                _check_coverage(db)
                for col in SEALED:
                    ident(col.table, col.column, *col.key)
                    update = db.sql(
                        f"UPDATE {col.table} SET {col.column} = ? WHERE "  # noqa: S608
                        + " AND ".join(f"{k} = ?" for k in col.key)
                    )
                    count = 0
                    for rows in _walk(db, col):
                        batch = []
                        for row in rows:
                            key = _context(row[:-1])
                            plain = opener.open(col.purpose, bytes(row[-1]), key)
                            batch.append((sealer.seal(col.purpose, plain, key), *key))
                        db.conn.executemany(update, batch)
                        count += len(batch)
                        if progress is not None:
                            progress(f"re-sealing {col.table}", len(batch), 0)
                    counts[col.table] = count
                sealed_check = sealer.seal(
                    "meta.master_key_check", _KEY_CHECK_PLAINTEXT, ("master_key_check",)
                )
                set_meta = db.sql("UPDATE meta SET value = ? WHERE name = ?")
                db.conn.execute(set_meta, (sealed_check, "master_key_check"))
                db.conn.execute(set_meta, (new.key_id.encode(), "master_key_id"))
                append_audit(
                    db,
                    AuditEvent(
                        at=wall_time(),
                        actor="admin",
                        procedure="master-key-rotate",
                        outcome="OK",
                        hop="admin",
                        detail=f"from {old.key_id} to {new.key_id}, "
                        f"{sum(counts.values())} values re-sealed",
                    ),
                )
        except db.dialect.error as exc:
            raise StoreError(f"cannot re-seal {db.where}: {exc}") from None
    return counts


def finish_rotation(key_file: Path) -> None:
    """Step 3: move ``<key file>.new`` over ``<key file>`` (atomic) and fsync the folder."""
    os.replace(new_key_path(key_file), key_file)
    fsync_directory(key_file.parent)


def _opens(target: str, key: MasterKey) -> bool:
    try:
        SQLStore.open(target, master_key=key).close()
    except StoreError:
        return False
    return True


def rotate(
    target: str, key_file: Path, *, progress: Progress | None = None
) -> tuple[MasterKey, MasterKey, dict[str, int]]:
    """Rotate the master key in ``key_file`` for the database ``target``.

    Returns (old key, new key, re-sealed rows per table). Every server process of the
    database must be stopped first.

    Raises:
        ConfigurationError: the key file cannot be read or written.
        StoreError: the database is not sealed under the key file's key (nothing changed).
    """
    key_file = Path(key_file)
    old = MasterKey.load(key_file)
    pending = new_key_path(key_file)
    if pending.exists():
        # A rotation was interrupted. After its commit: finish it. Before: start again.
        half = MasterKey.load(pending)
        if _opens(target, half):
            finish_rotation(key_file)
            raise ConfigurationError(
                f"an interrupted rotation to master key {half.key_id} was found committed "
                f"and is now finished ({key_file} holds it); run rotate again for another key"
            )
        pending.unlink()
        fsync_directory(pending.parent)
    with contextlib.closing(SQLStore.open(target, master_key=old)):
        pass  # schema up to date, and sealed under ``old``: else a clear StoreError now
    new = MasterKey.generate(pending)
    counts = reseal(target, old, new, progress=progress)
    finish_rotation(key_file)
    return old, new, counts


def open_store_rotating(target: str, key_file: Path, key: MasterKey, **options: Any) -> SQLStore:
    """:meth:`SQLStore.open` that finishes a rotation interrupted after its commit.

    If the database does not open under ``key`` but opens under ``<key file>.new``, the
    rotation had committed: the new key file is moved into place and the store returned.
    Any other failure is raised as it was.
    """
    try:
        return SQLStore.open(target, master_key=key, **options)
    except StoreError:
        pending = new_key_path(key_file)
        if not pending.exists():
            raise
        try:
            new = MasterKey.load(pending)
            store = SQLStore.open(target, master_key=new, **options)
        except (StoreError, ConfigurationError):
            pass
        else:
            finish_rotation(key_file)
            _log.warning(
                "finished an interrupted master-key rotation: %s now holds key %s",
                key_file,
                new.key_id,
            )
            return store
        raise
