"""Backup and restore of the server store: a logical dump that moves between back ends.

Format (version 1)
==================

A backup file is::

    MAGIC (b"CPNS-BACKUP\\x00v1\\n", 16 bytes)
    a sequence of CBOR items:
        header   {"format": "cpns-backup", "version": 1, "schema_version": n,
                  "backend": "sqlite" | "postgresql", "created_at": epoch seconds,
                  "master_key_id": "8 hex", "server_id": str | null, "realm": str | null}
        for each table:
            {"table": name, "columns": [name, ...]}
            one CBOR array per row (values: int, text, bytes, null)
            null                                  (end of the table's rows)
        {"end": number of tables}
    SHA-256 of everything above (32 bytes)

Every table of the schema is dumped by name, with its columns by name, so a file made on
SQLite restores into PostgreSQL and back (the schema is the same; only types differ, and
the values are plain integers, text and bytes on both). The rows are read from ONE read
snapshot: a deferred SQLite transaction under WAL, or a ``REPEATABLE READ READ ONLY``
PostgreSQL transaction; a server may keep running while a backup is made.

Secrets stay sealed
===================

The secret columns are copied as they are: sealed under the master key (purpose
``store/<table>.<column>``, bound to the row's primary key), so the backup file reveals no
key without the master key, and is useless without it. The master key is NOT in the
backup: back it up separately (and keep the two apart). :func:`restore` refuses a backup
whose ``meta.master_key_check`` does not open under the key it is given, naming both key
IDs, before writing anything.

Written atomically, read whole
==============================

:func:`backup` streams into a 0600 temp file beside the target, fsyncs it and moves it
into place with a hard link, so the target is never half written and an existing file is
never overwritten. :func:`restore` checks the trailing checksum over the whole file before
it reads a single row, and writes everything in ONE transaction into an empty database:
a damaged file, a wrong master key, a non-empty database or any failed row leaves the
database as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import cbor2

from cpns.errors import ConfigurationError, StoreError
from cpns.records import AuditEvent
from cpns.runtime import wall_time
from cpns.store.bulk import (
    BATCH,
    Progress,
    RawDB,
    append_audit,
    ident,
    insert_rows,
    open_raw,
    open_target,
    write_transaction,
)
from cpns.store.masterkey import MasterKey, fsync_directory
from cpns.store.postgres import PGConnection, is_dsn, scrub
from cpns.store.sql import _KEY_CHECK_PLAINTEXT, SQLStore, _migrate, _Sealer

__all__ = ["BackupInfo", "FORMAT_VERSION", "MAGIC", "backup", "read_info", "restore"]

MAGIC: Final = b"CPNS-BACKUP\x00v1\n"
FORMAT_VERSION: Final = 1
_DIGEST_LEN: Final = 32
#: Tables dumped first, in this order (foreign keys: users before entities, pns before
#: pn_members); any other table of the schema follows in name order.
_FIRST: Final = ("meta", "users", "entities", "pns")
#: Not data: the schema version of the database restored into is its own.
_SKIP: Final = frozenset({"schema_version", "sqlite_sequence"})


@dataclass(frozen=True, slots=True)
class BackupInfo:
    """What a backup file says about itself, and the rows it holds per table."""

    schema_version: int
    backend: str
    created_at: int
    master_key_id: str
    server_id: str | None
    realm: str | None
    rows: dict[str, int]


# -- reading the schema ------------------------------------------------------------------


def _tables(db: RawDB) -> list[str]:
    if db.is_postgresql:
        rows = db.conn.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
        ).fetchall()
    else:
        rows = db.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
    names = sorted(str(r[0]) for r in rows if str(r[0]) not in _SKIP)
    first = [t for t in _FIRST if t in names]
    return first + [t for t in names if t not in first]


def _columns(db: RawDB, table: str) -> list[str]:
    ident(table)
    if db.is_postgresql:
        rows = db.conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE "
            "table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position",
            (table,),
        ).fetchall()
        return [str(r[0]) for r in rows]
    return [str(r[1]) for r in db.conn.execute(f"PRAGMA table_info({table})").fetchall()]


def _schema_version(db: RawDB) -> int:
    return int(db.conn.execute(db.dialect.version_get).fetchone()[0])


def _rows(db: RawDB, table: str, columns: list[str]) -> Iterator[tuple[Any, ...]]:
    ident(table, *columns)
    statement = f"SELECT {', '.join(columns)} FROM {table}"  # noqa: S608 (names checked)
    if isinstance(db.conn, PGConnection):
        yield from db.conn.stream(statement)
        return
    yield from db.conn.execute(statement)  # type: ignore[misc]  # sqlite3 cursors iterate


@contextlib.contextmanager
def _snapshot(db: RawDB) -> Iterator[None]:
    """One read snapshot for every SELECT of the block."""
    if db.is_postgresql:
        db.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    else:
        db.conn.execute("BEGIN DEFERRED")
        db.conn.execute("SELECT COUNT(*) FROM meta")  # the snapshot starts at the first read
    try:
        yield
    finally:
        if db.conn.in_transaction:
            db.conn.execute("ROLLBACK")


# -- backup ---------------------------------------------------------------------------------


class _HashingWriter:
    """A file object that also hashes what goes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self._raw.write(data)


def _value(value: Any) -> Any:
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def backup(
    store: SQLStore,
    path: Path,
    *,
    server_id: str | None = None,
    realm: str | None = None,
    progress: Progress | None = None,
) -> BackupInfo:
    """Write every table of ``store`` to a new backup file at ``path`` (never overwritten).

    Raises:
        ConfigurationError: ``path`` exists or cannot be written.
        StoreError: the database cannot be read.
    """
    path = Path(path)
    if path.exists():
        raise ConfigurationError(f"{path} already exists; a backup never overwrites a file")
    directory = path.parent
    if not directory.is_dir():
        raise ConfigurationError(f"directory {directory} does not exist")
    tmp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    counts: dict[str, int] = {}
    created = wall_time()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc}") from None
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb", buffering=1 << 20) as raw, open_raw(store) as db:
            out = _HashingWriter(raw)
            out.write(MAGIC)
            with _snapshot(db):
                version = _schema_version(db)
                tables = _tables(db)
                header = {
                    "format": "cpns-backup",
                    "version": FORMAT_VERSION,
                    "schema_version": version,
                    "backend": db.dialect.name,
                    "created_at": created,
                    "master_key_id": store._sealer.key_id,
                    "server_id": server_id,
                    "realm": realm,
                }
                dump = cbor2.dumps
                out.write(dump(header))
                for table in tables:
                    columns = _columns(db, table)
                    out.write(dump({"table": table, "columns": columns}))
                    count = 0
                    for row in _rows(db, table, columns):
                        out.write(dump([_value(v) for v in row]))
                        count += 1
                        if progress is not None and count % BATCH == 0:
                            progress(f"backup {table}", BATCH, 0)
                    if progress is not None:
                        progress(f"backup {table}", count % BATCH, 0)
                    out.write(dump(None))
                    counts[table] = count
                out.write(dump({"end": len(tables)}))
            raw.write(out.digest.digest())
            raw.flush()
            os.fsync(raw.fileno())
        os.link(tmp, path)
        os.unlink(tmp)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, FileExistsError):
            raise ConfigurationError(f"{path} already exists") from None
        if isinstance(exc, store._dialect.error):
            raise StoreError(f"cannot read {store._where}: {store._scrub(exc)}") from None
        if isinstance(exc, OSError):
            raise ConfigurationError(f"cannot write {path}: {exc}") from None
        raise
    fsync_directory(directory)
    event = AuditEvent(
        at=wall_time(),
        actor="admin",
        procedure="backup",
        outcome="OK",
        hop="admin",
        detail=f"{sum(counts.values())} rows to {path.name}",
    )
    store.write(lambda tx: tx.audit(event))
    return BackupInfo(
        schema_version=version,
        backend=db.dialect.name,
        created_at=created,
        master_key_id=store._sealer.key_id,
        server_id=server_id,
        realm=realm,
        rows=counts,
    )


# -- reading a backup -----------------------------------------------------------------------


class _Reader:
    """The CBOR items of a checked backup file, and its header."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = path.open("rb")
        except OSError as exc:
            raise ConfigurationError(f"cannot read {path}: {exc}") from None
        try:
            self._verify()
            self._file.seek(len(MAGIC))
            self._decoder = cbor2.CBORDecoder(self._file)
            header = self.item()
            if (
                not isinstance(header, dict)
                or header.get("format") != "cpns-backup"
                or not isinstance(header.get("schema_version"), int)
            ):
                raise self._bad("no backup header")
            if header.get("version") != FORMAT_VERSION:
                raise ConfigurationError(
                    f"{path} is a backup of format version {header.get('version')}; "
                    f"this cpns reads version {FORMAT_VERSION}"
                )
            self.header: dict[str, Any] = header
        except BaseException:
            self._file.close()
            raise

    def _bad(self, why: str) -> ConfigurationError:
        return ConfigurationError(f"{self.path} is not a valid cpns backup ({why})")

    def _verify(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        if size < len(MAGIC) + _DIGEST_LEN or self._file.read(len(MAGIC)) != MAGIC:
            raise self._bad("it does not start with the backup magic")
        digest = hashlib.sha256(MAGIC)
        remaining = size - len(MAGIC) - _DIGEST_LEN
        while remaining:
            chunk = self._file.read(min(remaining, 1 << 20))
            if not chunk:
                raise self._bad("truncated")
            digest.update(chunk)
            remaining -= len(chunk)
        if digest.digest() != self._file.read(_DIGEST_LEN):
            raise ConfigurationError(
                f"{self.path} is damaged or truncated: its checksum does not match; "
                "nothing was restored"
            )
        self._end = size - _DIGEST_LEN

    def item(self) -> Any:
        if self._file.tell() >= self._end:
            raise self._bad("it ends early")
        try:
            return self._decoder.decode()
        except (cbor2.CBORDecodeError, EOFError, ValueError) as exc:
            raise self._bad(f"undecodable item: {exc}") from None

    def tables(self) -> Iterator[tuple[str, list[str], Iterator[list[Any]]]]:
        """(table, columns, rows) for each table; each row iterator must be used up."""
        while True:
            item = self.item()
            if isinstance(item, dict) and "end" in item:
                return
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("table"), str)
                or not isinstance(item.get("columns"), list)
                or not all(isinstance(c, str) for c in item["columns"])
            ):
                raise self._bad("expected a table header")
            columns: list[str] = item["columns"]
            ident(item["table"], *columns)
            yield item["table"], columns, self._rows(len(columns))

    def _rows(self, width: int) -> Iterator[list[Any]]:
        while (row := self.item()) is not None:
            if not isinstance(row, list) or len(row) != width:
                raise self._bad("a row does not match its table's columns")
            yield row

    def close(self) -> None:
        self._file.close()


def read_info(path: Path) -> BackupInfo:
    """Check a backup file (checksum, format) and count its rows, writing nothing."""
    reader = _Reader(Path(path))
    try:
        rows = {table: sum(1 for _ in it) for table, _, it in reader.tables()}
        h = reader.header
        return BackupInfo(
            schema_version=int(h["schema_version"]),
            backend=str(h.get("backend")),
            created_at=int(h.get("created_at") or 0),
            master_key_id=str(h.get("master_key_id")),
            server_id=h.get("server_id"),
            realm=h.get("realm"),
            rows=rows,
        )
    finally:
        reader.close()


# -- restore --------------------------------------------------------------------------------


def _check_key(rows: list[list[Any]], columns: list[str], master_key: MasterKey) -> None:
    meta = {str(r[columns.index("name")]): bytes(r[columns.index("value")]) for r in rows}
    check = meta.get("master_key_check")
    if check is None:
        raise ConfigurationError("the backup has no master key check row; nothing was restored")
    try:
        opened = _Sealer(master_key).open("meta.master_key_check", check, ("master_key_check",))
    except StoreError:
        expected = meta.get("master_key_id", b"unknown").decode("ascii", "replace")
        raise ConfigurationError(
            f"the backup was sealed under master key {expected}, but this server's master key "
            f"is {master_key.key_id}: put the master key that was backed up with it in place "
            "(master.key, mode 0600, or CPNS_MASTER_KEY) and run restore again; "
            "nothing was restored"
        ) from None
    if opened != _KEY_CHECK_PLAINTEXT:
        raise ConfigurationError("the backup's master key check is wrong; nothing was restored")


def _is_empty(db: RawDB, table: str) -> bool:
    ident(table)
    return db.conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is None  # noqa: S608


def _reset_identities(db: RawDB) -> None:
    """PostgreSQL: move identity sequences past the restored ids (SQLite does it itself)."""
    rows = db.conn.execute(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND is_identity = 'YES'"
    ).fetchall()
    for table, column in rows:
        ident(str(table), str(column))
        db.conn.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "  # noqa: S608
            f"COALESCE(MAX({column}), 1), MAX({column}) IS NOT NULL) FROM {table}"
        )


def restore(
    target: str,
    path: Path,
    *,
    master_key: MasterKey,
    server_id: str | None = None,
    realm: str | None = None,
    progress: Progress | None = None,
) -> BackupInfo:
    """Load a backup into the empty database ``target`` (a SQLite file or a URL).

    The schema is created or migrated first; then, in ONE transaction, every table of
    the database must be empty (but ``meta``, whose rows name the master key of a fresh
    ``cpns server init`` and are replaced), and every row of the backup is inserted.

    Raises:
        ConfigurationError: the file is damaged, of another format, sealed under another
            master key, made for another server ID or realm, of a newer schema, or the
            database is not empty. Nothing is written then.
        StoreError: the database cannot be reached or refuses a row (nothing written).
    """
    reader = _Reader(Path(path))
    try:
        header = reader.header
        for name, mine in (("server_id", server_id), ("realm", realm)):
            theirs = header.get(name)
            if mine is not None and theirs is not None and theirs != mine:
                raise ConfigurationError(
                    f"the backup is of a server with {name} {theirs!r}, this one has "
                    f"{mine!r} (server.toml); nothing was restored"
                )
        with open_target(target) as db:
            try:
                latest = _migrate(db.conn, db.dialect, db.where)
                if int(header["schema_version"]) > latest:
                    raise ConfigurationError(
                        f"the backup has schema version {header['schema_version']}, newer "
                        f"than this cpns ({latest}); upgrade cpns first"
                    )
                counts = _load(db, reader, master_key, progress)
            except db.dialect.error as exc:
                text = scrub(str(exc), target) if is_dsn(target) else str(exc)
                raise StoreError(f"cannot restore into {db.where}: {text}") from None
    finally:
        reader.close()
    # The restored database must open as the server opens it (schema, master key).
    SQLStore.open(target, master_key=master_key).close()
    return BackupInfo(
        schema_version=int(header["schema_version"]),
        backend=str(header.get("backend")),
        created_at=int(header.get("created_at") or 0),
        master_key_id=str(header.get("master_key_id")),
        server_id=header.get("server_id"),
        realm=header.get("realm"),
        rows=counts,
    )


def _load(
    db: RawDB, reader: _Reader, master_key: MasterKey, progress: Progress | None
) -> dict[str, int]:
    counts: dict[str, int] = {}
    with write_transaction(db):
        present = set(_tables(db))
        for table in present - {"meta"}:
            if not _is_empty(db, table):
                raise ConfigurationError(
                    f"{db.where} is not empty (table {table} has rows): restore only into "
                    "the empty database of a freshly initialised server; nothing was restored"
                )
        for table, columns, rows in reader.tables():
            if table not in present:
                raise ConfigurationError(
                    f"the backup has a table {table} this cpns does not know; nothing was restored"
                )
            known = set(_columns(db, table))
            unknown = [c for c in columns if c not in known]
            if unknown:
                raise ConfigurationError(
                    f"the backup's table {table} has columns {unknown} this cpns does not "
                    "know; nothing was restored"
                )
            if table == "meta":
                meta_rows = list(rows)
                _check_key(meta_rows, columns, master_key)
                db.conn.execute("DELETE FROM meta")
                counts[table] = insert_rows(db, table, columns, meta_rows)
                continue
            counts[table] = insert_rows(
                db, table, columns, rows, progress=progress, phase=f"restore {table}"
            )
        if "meta" not in counts:
            raise ConfigurationError("the backup has no meta table; nothing was restored")
        if db.is_postgresql:
            _reset_identities(db)  # before the audit row below takes the next id
        header = reader.header
        append_audit(
            db,
            AuditEvent(
                at=wall_time(),
                actor="admin",
                procedure="restore",
                outcome="OK",
                hop="admin",
                detail=f"{sum(counts.values())} rows from {reader.path.name} (made at "
                f"{header.get('created_at')} on {header.get('backend')})",
            ),
        )
    if db.is_postgresql:
        db.conn.execute("ANALYZE")  # planner statistics for the tables just filled
    return counts
