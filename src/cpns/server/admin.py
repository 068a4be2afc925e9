"""Administration on the server's store: users, manufacturer TK records, entities.

These run in the operator's process (``cpns admin ...``) against the same database the
server uses; SQLite (WAL) and the store's transactions make that safe while it runs.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import csv
import io
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cpns.crypto.hashing import KEY_LEN
from cpns.crypto.kdf import password_key
from cpns.errors import ConfigurationError
from cpns.messages.constants import ID_PATTERN, entity_id_problem
from cpns.records import AuditEvent, EntityRecord, PNMember, PNRecord, TKRecord, UserRecord
from cpns.runtime import wall_time
from cpns.store import bulk
from cpns.store.base import ServerStore, WriteTx
from cpns.store.bulk import BATCH, Progress
from cpns.store.sql import SQLStore

__all__ = [
    "TKImportError",
    "UserRow",
    "add_user",
    "import_tk_csv",
    "import_users_csv",
    "parse_tk_csv",
    "parse_user_csv",
    "pn_view",
    "purge_audit",
    "set_revoked",
]


class TKImportError(ConfigurationError):
    """A TK CSV file is invalid; ``line`` names the first bad line (1-based)."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line


def add_user(store: ServerStore, user_id: str, password: str, *, realm: str) -> UserRecord:
    """Register a CPNS User: store the scrypt password key, never the password."""
    if ID_PATTERN.fullmatch(user_id) is None:
        raise ConfigurationError(f"{user_id!r} is not a valid User ID")
    if len(password) < 8:
        raise ConfigurationError("the password must have at least 8 characters")
    now = wall_time()
    user = UserRecord(
        user_id=user_id,
        password_key=password_key(password, realm=realm, user_id=user_id),
        created_at=now,
    )

    def write(tx: WriteTx) -> None:
        tx.add_user(user)
        tx.audit(
            AuditEvent(
                at=now,
                actor="admin",
                procedure="user-add",
                outcome="OK",
                user_id=user_id,
                hop="admin",
            )
        )

    store.write(write)
    return user


class _CSVReader:
    """``csv.reader`` whose syntax errors are :class:`TKImportError` naming the line.

    The csv module raises ``csv.Error`` (an oversize field, a bad quote) that must not
    escape the importer (issue 5 item 17, found by the TK CSV fuzz target).
    """

    def __init__(self, text: str) -> None:
        self._reader = csv.reader(io.StringIO(text, newline=""))

    @property
    def line_num(self) -> int:
        return self._reader.line_num

    def __iter__(self) -> _CSVReader:
        return self

    def __next__(self) -> list[str]:
        try:
            return next(self._reader)
        except csv.Error as exc:
            raise TKImportError(self._reader.line_num or 1, f"not valid CSV: {exc}") from None


@dataclass(frozen=True, slots=True)
class _Row:
    line: int
    record: TKRecord


def parse_tk_csv(text: str, *, source: str, server_id: str | None = None) -> Iterator[_Row]:
    """Yield validated TK records from CSV text (header ``entity_id,tk``, TK in hex).

    Every Entity ID must be registrable (canonical, not reserved, not ``server_id``:
    :func:`~cpns.messages.constants.entity_id_problem`). Raises :class:`TKImportError` at
    the first bad line, naming it.
    """
    reader = _CSVReader(text)
    header = next(reader, None)
    if header is None:
        raise TKImportError(1, "empty file (expected a header 'entity_id,tk')")
    names = [h.strip().lower() for h in header]
    if names[:2] != ["entity_id", "tk"]:
        raise TKImportError(1, f"header must start with 'entity_id,tk', got {header!r}")
    seen: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) < 2:
            raise TKImportError(line, "expected two columns: entity_id,tk")
        entity_id, tk_hex = row[0].strip(), row[1].strip()
        problem = entity_id_problem(entity_id, server_id=server_id)
        if problem is not None:
            raise TKImportError(line, f"Entity ID {entity_id!r}: {problem}")
        try:
            tk = bytes.fromhex(tk_hex)
        except ValueError:
            raise TKImportError(line, "the TK is not hexadecimal") from None
        if not 16 <= len(tk) <= 64:
            raise TKImportError(line, f"the TK has {len(tk)} bytes; 16 to 64 are accepted")
        if entity_id in seen:
            raise TKImportError(line, f"{entity_id!r} already appears on line {seen[entity_id]}")
        seen[entity_id] = line
        yield _Row(
            line, TKRecord(entity_id=entity_id, tk=tk, source=source, imported_at=wall_time())
        )


def _read_csv_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from None


def import_tk_csv(
    store: ServerStore,
    path: Path,
    *,
    progress: Progress | None = None,
    server_id: str | None = None,
) -> int:
    """Import a manufacturer CSV all or nothing; return the number of records.

    The whole file is validated first (a bad row is reported with its line number and
    nothing is imported), then written in one transaction, so a duplicate of a record
    already in the database also leaves the database unchanged. On the SQL store the
    records are sealed before the transaction and inserted in batches (COPY on
    PostgreSQL): a million records take about a minute (docs/operations.md).
    ``progress(phase, rows, total)`` is told of each batch validated, sealed and written.
    """
    text = _read_csv_file(path)
    # For the progress bar only: data lines (an exact count of CSV records would need a
    # second parse).
    lines = sum(1 for line in text.splitlines()[1:] if line.strip())
    records: list[TKRecord] = []
    for row in parse_tk_csv(text, source=path.name, server_id=server_id):
        records.append(row.record)
        if progress is not None and len(records) % BATCH == 0:
            progress("validating", BATCH, lines)
    if progress is not None:
        progress("validating", len(records) % BATCH, lines)
    now = wall_time()
    event = AuditEvent(
        at=now,
        actor="admin",
        procedure="tk-import",
        outcome="OK",
        hop="admin",
        detail=f"{len(records)} from {path.name}",
    )
    if isinstance(store, SQLStore):
        return bulk.import_tks(store, records, audit=event, progress=progress)

    def write(tx: WriteTx) -> None:
        tx.put_tks(records)
        tx.audit(event)

    store.write(write)
    return len(records)


# -- users in bulk ---------------------------------------------------------------------------


def _hash_password(item: tuple[str, str, str]) -> bytes:
    """Process-pool worker: the scrypt password key of (password, realm, user_id)."""
    password, realm, user_id = item
    return password_key(password, realm=realm, user_id=user_id)


@dataclass(frozen=True, slots=True)
class UserRow:
    """One line of a user CSV: the User ID and either a password or its password key."""

    line: int
    user_id: str
    password: str | None = field(default=None, repr=False)
    password_key: bytes | None = field(default=None, repr=False)


def parse_user_csv(text: str) -> Iterator[UserRow]:
    """Yield validated rows of a user CSV; :class:`TKImportError` names the first bad line.

    The header is ``user_id,password`` (passwords, hashed on import) or
    ``user_id,password_key`` (Hash(Password) of 003 already computed by the operator's
    provisioning system: scrypt as in :func:`cpns.crypto.kdf.password_key`, 64 hex digits).
    """
    reader = _CSVReader(text)
    header = next(reader, None)
    if header is None:
        raise TKImportError(1, "empty file (expected a header 'user_id,password')")
    names = [h.strip().lower() for h in header]
    if names[:2] not in (["user_id", "password"], ["user_id", "password_key"]):
        raise TKImportError(
            1,
            f"header must start with 'user_id,password' or 'user_id,password_key', got {header!r}",
        )
    hashed = names[1] == "password_key"
    seen: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) < 2:
            raise TKImportError(line, f"expected two columns: user_id,{names[1]}")
        user_id = row[0].strip()
        if ID_PATTERN.fullmatch(user_id) is None:
            raise TKImportError(line, f"{user_id!r} is not a valid User ID")
        if user_id in seen:
            raise TKImportError(line, f"{user_id!r} already appears on line {seen[user_id]}")
        seen[user_id] = line
        if hashed:
            try:
                key = bytes.fromhex(row[1].strip())
            except ValueError:
                raise TKImportError(line, "the password key is not hexadecimal") from None
            if len(key) != KEY_LEN:
                raise TKImportError(line, f"the password key has {len(key)} bytes; it is {KEY_LEN}")
            yield UserRow(line, user_id, password_key=key)
        else:
            if len(row[1]) < 8:
                raise TKImportError(line, "the password must have at least 8 characters")
            yield UserRow(line, user_id, password=row[1])


def import_users_csv(
    store: ServerStore,
    path: Path,
    *,
    realm: str,
    progress: Progress | None = None,
    workers: int | None = None,
) -> int:
    """Register the users of a CSV all or nothing (see :func:`parse_user_csv`).

    Passwords are turned into password keys with scrypt in a pool of ``workers``
    processes (default: one per CPU); scrypt is slow on purpose (about 40 ms each), so
    a million passwords take hours, while a million precomputed password keys import in
    about a minute (docs/operations.md).
    """
    text = _read_csv_file(path)
    rows = list(parse_user_csv(text))
    if progress is not None:
        progress("validating", len(rows), len(rows))
    keys: list[bytes] = [r.password_key for r in rows if r.password_key is not None]
    if len(keys) != len(rows):
        todo = [(r.password or "", realm, r.user_id) for r in rows]
        keys = []
        context = multiprocessing.get_context("spawn")  # no fork of a threaded process
        try:
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                for key in pool.map(_hash_password, todo, chunksize=8):
                    keys.append(key)
                    if progress is not None:
                        progress("hashing passwords", 1, len(todo))
        except concurrent.futures.process.BrokenProcessPool as exc:
            raise ConfigurationError(
                f"a password-hashing process died ({exc}); nothing was imported"
            ) from None
    now = wall_time()
    users = [
        UserRecord(user_id=r.user_id, password_key=k, created_at=now)
        for r, k in zip(rows, keys, strict=True)
    ]
    event = AuditEvent(
        at=now,
        actor="admin",
        procedure="user-import",
        outcome="OK",
        hop="admin",
        detail=f"{len(users)} from {path.name}",
    )
    if isinstance(store, SQLStore):
        return bulk.import_users(store, users, audit=event, progress=progress)

    def write(tx: WriteTx) -> None:
        for user in users:
            tx.add_user(user)
        tx.audit(event)

    store.write(write)
    return len(users)


def set_revoked(store: ServerStore, entity_id: str, revoked: bool) -> EntityRecord:
    """Revoke (or restore) an entity; it can no longer authenticate."""
    entity = store.get_entity(entity_id)
    if entity is None:
        raise ConfigurationError(f"no entity {entity_id!r}")
    now = wall_time()

    def write(tx: WriteTx) -> None:
        tx.set_revoked(entity_id, revoked)
        tx.audit(
            AuditEvent(
                at=now,
                actor="admin",
                procedure="revoke" if revoked else "restore",
                outcome="OK",
                entity_id=entity_id,
                hop="admin",
            )
        )

    store.write(write)
    result = store.get_entity(entity_id)
    assert result is not None
    return result


def purge_audit(store: ServerStore, *, days: int, now: int | None = None) -> int:
    """Delete audit events older than ``days`` days (retention, D-SRV-2); return how many.

    The purge itself is audited, so the trail says who shortened it and when.
    """
    if days < 1:
        raise ConfigurationError("the audit retention must be at least 1 day")
    at = wall_time() if now is None else now

    def write(tx: WriteTx) -> int:
        gone = tx.purge_audit(before=at - days * 86400)
        tx.audit(
            AuditEvent(
                at=at,
                actor="admin",
                procedure="audit-purge",
                outcome="OK",
                hop="admin",
                detail=f"{gone} events older than {days} days",
            )
        )
        return gone

    return store.write(write)


# -- the PN inventory ------------------------------------------------------------------------


def _member_view(member: PNMember) -> dict[str, object]:
    return {
        "pne_id": member.pne_id,
        "flow": member.flow or None,
        "status": member.status,
        "at": member.at,
    }


def pn_view(pn: PNRecord, *, detail: bool = False) -> dict[str, object]:
    """A PN of the inventory as plain data (``cpns admin pn list|show --json``).

    Without ``detail``: counts of members and failures. With it: each member and each
    failure with its flow (None if the PNE was refused before one was chosen), status and
    time. Never a secret: the inventory holds none.
    """
    view: dict[str, object] = {
        "pn_id": pn.pn_id,
        "gateway_id": pn.gateway_id,
        "owner": pn.owner,
        "created_at": pn.created_at,
        "updated_at": pn.updated_at,
    }
    if detail:
        view["members"] = [_member_view(m) for m in pn.joined]
        view["failed"] = [_member_view(m) for m in pn.failed]
    else:
        view["members"] = len(pn.joined)
        view["failed"] = len(pn.failed)
    return view
